"""Runtimes run an image's entry points: the training job of a trial and the inference server.

Both follow the SageMaker container layout, so existing images run unchanged.
"""

from pml.runtimes.base import InferenceServer, TrainingJob, TrainingOutcome
from pml.runtimes.process import ProcessRuntime

__all__ = ["InferenceServer", "TrainingJob", "TrainingOutcome", "ProcessRuntime", "runtime_for"]


def runtime_for(kind: str) -> ProcessRuntime:
    """The runtime an image registry entry names; never guessed from the URI."""
    if kind == "process":
        return ProcessRuntime()
    raise ValueError(f"unknown runtime kind {kind!r}")
