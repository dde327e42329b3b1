"""Runtimes run an image's entry points: the training job of a trial and the inference server.

Both follow the SageMaker container layout, so existing images run unchanged.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

from pml.runtimes.base import InferenceServer, Runtime, TrainingJob, TrainingOutcome
from pml.runtimes.process import ProcessRuntime

if TYPE_CHECKING:
    from pml.runtimes.docker import DockerRuntime

__all__ = [
    "InferenceServer", "Runtime", "TrainingJob", "TrainingOutcome", "ProcessRuntime", "runtime_for",
    "stop_server_elsewhere",
]


def runtime_for(kind: str) -> Runtime:
    """The runtime an image registry entry names; never guessed from the URI."""
    if kind == "process":
        return ProcessRuntime()
    if kind == "docker":
        return _docker_runtime()
    raise ValueError(f"unknown runtime kind {kind!r}")


def _docker_runtime() -> "DockerRuntime":
    # Imported on use: the process runtime (the embedded default) needs no docker SDK import.
    from pml.runtimes.docker import DockerRuntime

    return DockerRuntime()


def stop_server_elsewhere(endpoint: str, pid: int | None) -> None:
    """Stop an inference server that another process on this host started.

    A process server is known by its process group (``pid``); a docker server has no pid of
    pml's and is found by its endpoint label in the local engine.
    """
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        return
    if endpoint:
        from pml.runtimes.docker import stop_server_at

        stop_server_at(endpoint)
