"""The process runtime: an image's entry points as local processes (the embedded default).

The SageMaker layout lives under a per-trial folder and ``SM_*`` variables point at it. Each
job runs in its own process group, and the whole group is killed on stop and timeout, and
when the process that started it dies (Ray kills a trial's worker to stop it), so nothing is
left behind.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from pml.images import ResolvedImage
from pml.runtimes.base import TrainingJob, TrainingOutcome, wait_until_pinged

LOG_TAIL_LINES = 20
STOP_GRACE_S = 5.0

_live_servers: set["ProcessServer"] = set()

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Looked up once here, not in the forked child: a child of a threaded process (a Ray worker)
# must not take the loader's locks that another thread may have held at the fork.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
# Kills a job's process group when its parent dies. start_new_session puts the job out of
# reach of the killer of its parent (Ray kills a stopped trial's worker process), and the
# kernel's parent-death signal reaches the entry point only, not what it started; so this
# small process, not in the group, turns its own parent-death signal into a kill of the group.
_GROUP_WATCHDOG = (
    "import os, signal, sys\n"
    "group = int(sys.argv[1])\n"
    "def kill(*_):\n"
    "    try: os.killpg(group, signal.SIGKILL)\n"
    "    except OSError: pass\n"
    "    os._exit(0)\n"
    "signal.signal(signal.SIGTERM, kill)\n"
    "if os.getppid() != int(sys.argv[2]): kill()\n"
    "while True: signal.pause()\n"
)


def _die_with_parent(signum: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``signum`` when the thread that started it dies."""
    parent = os.getpid()

    def set_death_signal() -> None:
        _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signum)

    return set_death_signal


def _start_watchdog(group: int) -> subprocess.Popen[bytes]:
    """Start the process that kills ``group`` if this process dies before the job ends."""
    return subprocess.Popen(
        [sys.executable, "-S", "-I", "-c", _GROUP_WATCHDOG, str(group), str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent(signal.SIGTERM), close_fds=True,
    )


def _base_env() -> dict[str, str]:
    """A small environment: the images see no pml settings or secrets of the host process."""
    # The venv's bin first, so an entry point's "#!/usr/bin/env python3" finds its packages.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])
    env = {"PATH": path, "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
    for name in ("HOME", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL what is still there after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProcessServer:
    """An inference server started from an image's ``serve`` entry point."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path):
        self.process = process
        self.pid: int | None = process.pid
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        _live_servers.discard(self)
        if self.process.poll() is None:
            _kill_group(self.process)

    def wait_healthy(self, timeout_s: float) -> None:
        def exited() -> tuple[object, list[str]]:
            tail = self.log_path.read_text(errors="replace").splitlines()[-5:] if self.log_path.exists() else []
            return self.process.returncode, tail

        wait_until_pinged(self, timeout_s, "inference server", exited)


class ProcessRuntime:
    kind = "process"

    def train(self, job: TrainingJob, on_line: Callable[[str], None]) -> TrainingOutcome:
        """Run the image's ``train``; every output line goes to ``on_line`` as it arrives."""
        job.lay_out()
        entry = job.image.entry_point("train")
        env = _base_env()
        env.update(
            {
                "SM_MODEL_DIR": str(job.model_dir),
                "SM_INPUT_DIR": str(job.folder / "input"),
                "SM_INPUT_CONFIG_DIR": str(job.config_dir),
                "SM_OUTPUT_DIR": str(job.output_dir),
                "SM_OUTPUT_DATA_DIR": str(job.output_dir / "data"),
                "SM_CHANNELS": json.dumps(sorted(job.channels)),
                "SM_HPS": json.dumps(job.hyperparameters),
                "SM_NUM_GPUS": str(len(job.gpu_ids)),
                "SM_NUM_CPUS": str(max(1, int(job.cpus))),
                # Only the GPUs Ray assigned to this trial (none: none visible).
                "CUDA_VISIBLE_DEVICES": ",".join(job.gpu_ids),
            }
        )
        for name, path in job.channels.items():
            env[f"SM_CHANNEL_{name.upper()}"] = str(path)
        log_dir = job.folder / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [str(entry)], cwd=job.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent(signal.SIGKILL),
        )
        watchdog = _start_watchdog(process.pid)
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            _kill_group(process)

        timer = threading.Timer(job.timeout_s, on_timeout)
        timer.daemon = True
        timer.start()
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        try:
            assert process.stdout is not None
            with open(log_dir / "train.log", "w") as log:
                for raw in process.stdout:
                    line = raw.decode("utf-8", errors="replace").rstrip("\n")
                    log.write(line + "\n")
                    log.flush()
                    tail.append(line)
                    on_line(line)
            process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                _kill_group(process)
            else:
                # The entry point may have left children in its group; they go too.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            watchdog.kill()
            watchdog.wait()
        return TrainingOutcome(
            exit_code=process.returncode,
            timed_out=timed_out.is_set(),
            failure=job.failure_reason(),
            log_tail=list(tail),
        )

    def start_server(self, image: ResolvedImage, model_dir: Path, log_path: Path,
                     outlive_owner: bool = False) -> ProcessServer:
        """Start ``serve`` on a free loopback port; call ``wait_healthy`` before using it.

        ``outlive_owner`` is part of the runtime interface; a process server always ends with
        the process that started it (the docker runtime can keep a deployment serving).
        """
        entry = image.entry_point("serve")
        port = free_port()
        env = _base_env()
        env.update(
            {
                "SM_MODEL_DIR": str(model_dir),
                "SAGEMAKER_BIND_TO_PORT": str(port),
                "PML_BIND_HOST": "127.0.0.1",
            }
        )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [str(entry)], cwd=model_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        server = ProcessServer(process, port, log_path)
        _live_servers.add(server)
        return server


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_live_servers):
        server.stop()
