"""Tuning: the search space, metrics read from logs, one trial, and the Ray Tune experiment."""
