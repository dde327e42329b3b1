"""Datasets: image checks, patient-grouped time-based splits, immutable snapshots, channels."""
