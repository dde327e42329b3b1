"""Removes a container once the process that started it is gone: containers outlive their clients.

Run as ``python -m pml.runtimes.watchdog CONTAINER_NAME``; see ``ContainerWatchdog``.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

# Seconds the owner waits for the watchdog to say it is connected to the engine.
READY_TIMEOUT_S = 30.0
# A create request in flight when the owner died may land after the first removal.
ORPHAN_RECHECKS = 3
DONE = b"done\n"


class WatchdogFailed(Exception):
    """The watchdog could not start; without it a killed owner would leave its container behind."""


class ContainerWatchdog:
    """A detached process that removes one container (by name) when its owner's pipe closes.

    Ray kills a trial's worker process (and its process group and children) when it stops a
    trial, which also ends any thread that would stop the container. The watchdog therefore
    runs in its own session, reparented away from the owner, and blocks on a pipe whose only
    writer is the owner: the pipe closes when the owner ends in any way, SIGKILL included. It
    is started before the container is created, so there is no moment without it.
    """

    def __init__(self, container_name: str):
        self.container_name = container_name
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pml.runtimes.watchdog", container_name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd="/", start_new_session=True,
        )
        # The first process forks the watchdog and exits at once (the double fork).
        self._process.wait(READY_TIMEOUT_S)
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], READY_TIMEOUT_S)
        line = self._process.stdout.readline() if ready else b""
        self._process.stdout.close()
        if line.strip() != b"ready":
            self.release()
            raise WatchdogFailed(
                f"the container watchdog for {container_name} did not start "
                f"({line.decode(errors='replace').strip() or 'no answer'})"
            )

    def release(self) -> None:
        """The owner removed the container itself: the watchdog only checks once and exits."""
        stdin = self._process.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.write(DONE)
                stdin.close()
            except (BrokenPipeError, OSError):
                pass


def _remove(client, name: str) -> bool:  # type: ignore[no-untyped-def]
    """Remove the container; True when it existed."""
    import docker

    try:
        client.containers.get(name).remove(force=True)
        return True
    except docker.errors.NotFound:
        return False


def main(name: str) -> int:
    if os.fork() > 0:
        os._exit(0)  # the owner's child exits; the watchdog is reparented away from the owner
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure means "not ready"; the owner reports it
        os.write(1, f"engine unreachable: {type(exc).__name__}\n".encode())
        return 1
    os.write(1, b"ready\n")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # the owner stops reading; later writes must not fail
    received = b""
    while chunk := os.read(0, 4096):
        received += chunk
    if received.endswith(DONE):
        _remove(client, name)
        return 0
    _remove(client, name)
    for _ in range(ORPHAN_RECHECKS):
        time.sleep(1.0)
        _remove(client, name)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pml.runtimes.watchdog CONTAINER_NAME")
    sys.exit(main(sys.argv[1]))
