"""The docker runtime: an image's ``train`` and ``serve`` as containers on a Docker engine.

Same SageMaker layout as the process runtime, mounted at ``/opt/ml``; training gets no network
(patient data never leaves), inference uses the host's network bound to 127.0.0.1.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import docker
from docker.errors import APIError, DockerException, NotFound
from docker.errors import ImageNotFound as DockerImageNotFound
from docker.models.containers import Container
from docker.types import DeviceRequest

from pml.errors import ImageNotFound, StepFailed
from pml.images import ResolvedImage
from pml.runtimes.base import DEFAULT_MEMORY_BYTES, TrainingJob, TrainingOutcome, wait_until_pinged
from pml.runtimes.process import LOG_TAIL_LINES, free_port
from pml.runtimes.watchdog import ContainerWatchdog, WatchdogFailed

log = logging.getLogger(__name__)

STOP_GRACE_S = 5
OPT_ML = "/opt/ml"
# Labels on every container pml starts, so operators (and tests) can find them.
ROLE_LABEL = "pml.role"
OWNER_LABEL = "pml.owner"
ENDPOINT_LABEL = "pml.endpoint"

_live_servers: set["DockerServer"] = set()


class DockerEngineUnavailable(StepFailed):
    """No Docker engine answers where this process looks for one (DOCKER_HOST or the socket)."""


def engine() -> docker.DockerClient:
    """A client of the local engine; raises DockerEngineUnavailable with the reason."""
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        raise DockerEngineUnavailable(
            f"the Docker engine on {socket.gethostname()} is not reachable "
            f"(DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unset: unix:///var/run/docker.sock')}): {exc}"
        ) from None
    return client


def check_image(reference: str) -> None:
    """Raise unless the local engine answers and holds ``reference`` (no pull: no registry)."""
    client = engine()
    try:
        client.images.get(reference)
    except DockerImageNotFound:
        raise ImageNotFound(_missing_image(reference)) from None
    finally:
        client.close()


def _missing_image(reference: str) -> str:
    return (
        f"docker image {reference!r} is not in the Docker engine on {socket.gethostname()}; "
        f"build or pull it there first (scripts/docker-images builds the example's)"
    )


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _user() -> str:
    # Files the image writes into the trial folder belong to pml's user, not to root.
    return f"{os.getuid()}:{os.getgid()}"


def _lines(frames: Iterator[tuple[bytes | None, bytes | None]]) -> Iterator[str]:
    """Whole lines from a demultiplexed attach stream, kept apart per stream.

    The engine's frames do not follow line ends, and stdout and stderr frames interleave:
    a partial stdout line must not be glued to the stderr frame that comes next.
    """
    pending = [b"", b""]
    for frame in frames:
        for stream, chunk in enumerate(frame):
            if not chunk:
                continue
            pending[stream] += chunk
            *lines, pending[stream] = pending[stream].split(b"\n")
            for line in lines:
                yield line.decode("utf-8", errors="replace").rstrip("\r")
    for rest in pending:
        if rest:
            yield rest.decode("utf-8", errors="replace").rstrip("\r")


def _remove(container: Container) -> None:
    try:
        container.remove(force=True)
    except NotFound:
        pass


class DockerRuntime:
    kind = "docker"

    def train(self, job: TrainingJob, on_line: Callable[[str], None]) -> TrainingOutcome:
        """Run ``docker run IMAGE train`` on the job's layout; lines go to ``on_line`` as they come.

        Engine errors (unreachable, image missing, GPUs that cannot be given) come back as a
        failed outcome with the reason, like a failing image, so the trial records them.
        """
        job.lay_out()
        for name in job.channels:
            # Mount points made here, not by the engine (it would make them root's).
            (job.folder / "input" / "data" / name).mkdir(parents=True, exist_ok=True)
        log_dir = job.folder / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            client = engine()
        except DockerEngineUnavailable as exc:
            return TrainingOutcome(exit_code=-1, failure=str(exc))
        name = f"pml-train-{uuid.uuid4().hex[:16]}"
        try:
            watchdog = ContainerWatchdog(name)
        except WatchdogFailed as exc:
            client.close()
            return TrainingOutcome(exit_code=-1, failure=str(exc))
        container: Container | None = None
        timed_out = threading.Event()
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        try:
            try:
                container = client.containers.create(name=name, **self._train_options(job))
                # Attached before it starts, so no line is missed; one stream each for stdout
                # and stderr (demux), so their partial lines never mix.
                frames = container.attach(stdout=True, stderr=True, stream=True, demux=True)
                container.start()
            except DockerImageNotFound:
                return TrainingOutcome(exit_code=-1, failure=_missing_image(str(job.image.reference)))
            except APIError as exc:
                return TrainingOutcome(
                    exit_code=-1,
                    failure=f"the Docker engine could not start the training container of "
                            f"{job.image.uri!r}: {exc.explanation or exc}",
                )

            def on_timeout() -> None:
                timed_out.set()
                try:
                    assert container is not None
                    container.stop(timeout=STOP_GRACE_S)
                except (APIError, NotFound):
                    pass

            timer = threading.Timer(job.timeout_s, on_timeout)
            timer.daemon = True
            timer.start()
            try:
                with open(log_dir / "train.log", "w") as log_file:
                    for line in _lines(frames):
                        log_file.write(line + "\n")
                        log_file.flush()
                        tail.append(line)
                        on_line(line)
                exit_code = int(container.wait()["StatusCode"])
            finally:
                timer.cancel()
            container.reload()
            failure = job.failure_reason()
            if failure is None and container.attrs["State"].get("OOMKilled"):
                failure = f"training ran out of memory (limit {job.memory_bytes // 2**20} MiB)"
            return TrainingOutcome(exit_code=exit_code, timed_out=timed_out.is_set(), failure=failure,
                                   log_tail=list(tail))
        finally:
            if container is not None:
                _remove(container)
            watchdog.release()
            client.close()

    def _train_options(self, job: TrainingJob) -> dict[str, Any]:
        assert job.image.reference is not None
        env = {
            "SM_MODEL_DIR": f"{OPT_ML}/model",
            "SM_INPUT_DIR": f"{OPT_ML}/input",
            "SM_INPUT_CONFIG_DIR": f"{OPT_ML}/input/config",
            "SM_OUTPUT_DIR": f"{OPT_ML}/output",
            "SM_OUTPUT_DATA_DIR": f"{OPT_ML}/output/data",
            "SM_CHANNELS": json.dumps(sorted(job.channels)),
            "SM_HPS": json.dumps(job.hyperparameters),
            "SM_NUM_GPUS": str(len(job.gpu_ids)),
            "SM_NUM_CPUS": str(max(1, int(job.cpus))),
            "PYTHONUNBUFFERED": "1",
        }
        volumes = {str(job.folder.resolve()): {"bind": OPT_ML, "mode": "rw"}}
        for name, path in job.channels.items():
            env[f"SM_CHANNEL_{name.upper()}"] = f"{OPT_ML}/input/data/{name}"
            volumes[str(path.resolve())] = {"bind": f"{OPT_ML}/input/data/{name}", "mode": "ro"}
        options: dict[str, Any] = {
            "image": job.image.reference,
            "command": ["train"],
            "environment": env,
            "volumes": volumes,
            "network_mode": "none",  # patient data never leaves the container
            "mem_limit": job.memory_bytes,
            "memswap_limit": job.memory_bytes,  # no swap on top: the limit is the limit
            "nano_cpus": int(job.cpus * 1e9),
            "init": True,  # signals reach the entry point, so stop is graceful
            "user": _user(),
            "labels": {ROLE_LABEL: "train", OWNER_LABEL: _owner()},
        }
        if job.gpu_ids:
            options["device_requests"] = [DeviceRequest(device_ids=list(job.gpu_ids), capabilities=[["gpu"]])]
        return options

    def start_server(self, image: ResolvedImage, model_dir: Path, log_path: Path,
                     outlive_owner: bool = False) -> "DockerServer":
        """Start ``docker run IMAGE serve`` on the host network, bound to a free 127.0.0.1 port.

        ``outlive_owner``: a deployment's server keeps serving when the worker that started it
        ends (it is stopped by endpoint when replaced); any other server (evaluation) is removed
        with its owner by a watchdog. Call ``wait_healthy`` before using it.
        """
        assert image.reference is not None
        client = engine()
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        name = f"pml-serve-{uuid.uuid4().hex[:16]}"
        watchdog = None if outlive_owner else ContainerWatchdog(name)
        try:
            container = client.containers.run(
                image.reference, ["serve"], name=name, detach=True,
                environment={
                    "SM_MODEL_DIR": f"{OPT_ML}/model",
                    "SAGEMAKER_BIND_TO_PORT": str(port),
                    "PML_BIND_HOST": "127.0.0.1",
                    "PYTHONUNBUFFERED": "1",
                },
                volumes={str(model_dir.resolve()): {"bind": f"{OPT_ML}/model", "mode": "ro"}},
                network_mode="host",  # never Docker's bridge; the server binds 127.0.0.1 only
                mem_limit=DEFAULT_MEMORY_BYTES, init=True, user=_user(),
                labels={ROLE_LABEL: "serve", OWNER_LABEL: _owner(), ENDPOINT_LABEL: endpoint},
            )
        except DockerImageNotFound:
            _cleanup_failed_start(client, name, watchdog)
            raise ImageNotFound(_missing_image(image.reference)) from None
        except APIError as exc:
            _cleanup_failed_start(client, name, watchdog)
            raise StepFailed(
                f"the Docker engine could not start the inference container of {image.uri!r}: "
                f"{exc.explanation or exc}"
            ) from None
        server = DockerServer(client, container, port, log_path, watchdog)
        _live_servers.add(server)
        return server


def _cleanup_failed_start(client: docker.DockerClient, name: str, watchdog: ContainerWatchdog | None) -> None:
    try:
        client.containers.get(name).remove(force=True)
    except (NotFound, APIError):
        pass
    if watchdog is not None:
        watchdog.release()
    client.close()


class DockerServer:
    """An inference container; ``stop`` keeps its log in ``log_path`` and removes it."""

    def __init__(self, client: docker.DockerClient, container: Container, port: int, log_path: Path,
                 watchdog: ContainerWatchdog | None):
        self.client, self.container, self.port, self.log_path = client, container, port, log_path
        self.watchdog = watchdog
        self.endpoint = f"http://127.0.0.1:{port}"
        self.pid: int | None = None  # no host process of pml's: stopped by endpoint, see stop_server_at
        self.name = str(container.name)

    def alive(self) -> bool:
        try:
            self.container.reload()
        except NotFound:
            return False
        return self.container.status == "running"

    def _log_tail(self, lines: int) -> list[str]:
        try:
            raw = self.container.logs(stdout=True, stderr=True, tail=lines)
        except (NotFound, APIError):
            return []
        return raw.decode("utf-8", errors="replace").splitlines()

    def wait_healthy(self, timeout_s: float) -> None:
        wait_until_pinged(self, timeout_s, "inference container",
                          lambda: (self.container.attrs.get("State", {}).get("ExitCode"), self._log_tail(5)))

    def stop(self) -> None:
        _live_servers.discard(self)
        try:
            self.container.stop(timeout=STOP_GRACE_S)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log_file:
                log_file.write(self.container.logs(stdout=True, stderr=True))
        except (NotFound, APIError):
            pass
        _remove(self.container)
        if self.watchdog is not None:
            self.watchdog.release()
        self.client.close()


def stop_server_at(endpoint: str) -> bool:
    """Stop and remove the inference container serving ``endpoint`` on this host's engine.

    A deployment's container outlives the worker that started it, so another worker replaces
    it by its endpoint. Returns whether one was found.
    """
    try:
        client = engine()
    except DockerEngineUnavailable:
        return False
    try:
        found = client.containers.list(all=True, filters={"label": f"{ENDPOINT_LABEL}={endpoint}"})
        for container in found:
            try:
                container.stop(timeout=STOP_GRACE_S)
            except (NotFound, APIError):
                pass
            _remove(container)
        return bool(found)
    finally:
        client.close()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_live_servers):
        if server.watchdog is not None:  # a deployment's server outlives this process on purpose
            server.stop()
