"""Worker pools: dramatiq workers in this process (embedded) or as separate processes.

Actors are registered on the App's broker before any message flows, so the same actor code
runs on the in-memory broker and on Redis.
"""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
import threading

import dramatiq
from dramatiq import Worker

from pml.app import App, set_current_app
from pml.broker import STEPS
from pml.tuning.tuner import shutdown_ray


def load_actors(broker: dramatiq.Broker) -> None:
    """Register every actor of ``actors/`` on ``broker`` (re-pointing them if already loaded)."""
    dramatiq.set_broker(broker)
    for name in STEPS.values():
        actor = getattr(importlib.import_module(f"actors.{name}"), name)
        if actor.broker is not broker:
            actor.broker = broker
            broker.declare_actor(actor)


def start_workers(app: App, queues: set[str] | None = None, threads: int | None = None) -> Worker:
    """Start consuming in this process; stop with ``worker.stop()``."""
    set_current_app(app)
    load_actors(app.broker)
    worker = Worker(app.broker, queues=queues, worker_threads=threads or app.settings.worker_threads)
    worker.start()
    return worker


def run_worker_process(app: App, queues: set[str] | None, threads: int | None) -> None:
    """Run a worker until SIGTERM or SIGINT, then stop it cleanly (messages in hand are requeued)."""
    worker = start_workers(app, queues, threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    worker.stop()
    shutdown_ray()


def spawn_worker_processes(queues: list[str], processes: int, threads: int) -> int:
    """``pml worker --processes N``: N single-process workers, stopped together."""
    command = [sys.executable, "-m", "pml.cli", "worker", "--processes", "1", "--threads", str(threads)]
    for queue in queues:
        command += ["--queues", queue]
    children = [subprocess.Popen(command) for _ in range(processes)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)
