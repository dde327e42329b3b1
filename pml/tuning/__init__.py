"""Tuning: the search space, metrics read from logs, one trial, and the Ray Tune experiment."""

import os

# Before any module here imports Ray: Ray's crash handler would take SIGTERM, print a crash
# report and abort the process; pml's own handlers stop a worker or pml serve cleanly.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
