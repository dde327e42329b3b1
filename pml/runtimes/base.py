"""What every runtime takes and gives: a training job in the SageMaker layout, and a server."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from pml.errors import StepFailed
from pml.images import ResolvedImage

# SageMaker's limit on the failure reason it keeps; the rest is in the log.
FAILURE_CHARS = 1024
# A training container's memory when the job names none: enough for the example images,
# small enough that one runaway trial cannot take a node's memory from the others.
DEFAULT_MEMORY_BYTES = 4 * 1024**3


@dataclass
class TrainingJob:
    image: ResolvedImage
    folder: Path
    """The trial's ``/opt/ml``: input/config, model, output live under it."""
    channels: dict[str, Path]
    hyperparameters: dict[str, str]
    timeout_s: float = 3600.0
    gpu_ids: list[str] = field(default_factory=list)
    """The GPUs Ray assigned to the trial (``ray.get_gpu_ids()``); the docker runtime passes them."""
    cpus: float = 1.0
    """CPU limit of the job (the docker runtime enforces it; both report it in ``SM_NUM_CPUS``)."""
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    """Memory limit of the job, swap included (enforced by the docker runtime)."""

    @property
    def config_dir(self) -> Path:
        return self.folder / "input" / "config"

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def output_dir(self) -> Path:
        return self.folder / "output"

    def lay_out(self) -> None:
        """Create the layout and write ``hyperparameters.json`` (values as strings)."""
        for path in (self.config_dir, self.model_dir, self.output_dir / "data"):
            path.mkdir(parents=True, exist_ok=True)
        hyperparameters = {k: str(v) for k, v in self.hyperparameters.items()}
        (self.config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=2))
        (self.config_dir / "inputdataconfig.json").write_text(
            json.dumps({name: {"TrainingInputMode": "File"} for name in self.channels}, indent=2)
        )

    def failure_reason(self) -> str | None:
        path = self.output_dir / "failure"
        if path.is_file():
            text = path.read_text(errors="replace")[:FAILURE_CHARS].strip()
            return text or None
        return None


@dataclass
class TrainingOutcome:
    exit_code: int
    timed_out: bool = False
    stopped: bool = False
    failure: str | None = None
    log_tail: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.stopped


class InferenceServer(Protocol):
    endpoint: str
    pid: int | None

    def stop(self) -> None: ...

    def alive(self) -> bool: ...

    def wait_healthy(self, timeout_s: float) -> None: ...


def answers_ping(endpoint: str, timeout_s: float = 2.0) -> bool:
    """Whether the inference server at ``endpoint`` serves: ``GET /ping`` answers 200."""
    try:
        with urllib.request.urlopen(f"{endpoint}/ping", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until_pinged(server: InferenceServer, timeout_s: float, what: str,
                      exited: Callable[[], tuple[object, list[str]]]) -> None:
    """Poll ``GET /ping`` until it answers 200; the server is stopped if it never does.

    ``exited`` gives the exit code and last log lines of a server that died while starting:
    the reason a person needs, raised as StepFailed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            code, tail = exited()
            server.stop()
            raise StepFailed(f"{what} exited with code {code} before it was healthy; "
                             f"last log lines: {' | '.join(tail)}")
        if answers_ping(server.endpoint):
            return
        time.sleep(0.1)
    server.stop()
    raise StepFailed(f"{what} was not healthy (GET /ping) within {timeout_s:.0f} s")


class Runtime(Protocol):
    """Runs an image's entry points; ``pml.runtimes.runtime_for`` picks one by registry entry."""

    kind: str

    def train(self, job: TrainingJob, on_line: Callable[[str], None]) -> TrainingOutcome: ...

    def start_server(self, image: ResolvedImage, model_dir: Path, log_path: Path,
                     outlive_owner: bool = False) -> InferenceServer: ...
