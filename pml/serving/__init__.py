"""Serving: talking to inference servers, deploying champions, predictions, artifacts."""
