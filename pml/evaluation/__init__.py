"""Evaluation: metrics computed by pml from predictions and ground truth, never by the image."""
