"""The process runtime leaves nothing behind: on timeout, and when the process that started
the job dies (as a Ray trial's worker does when Ray stops the trial)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from pml.images import ResolvedImage
from pml.runtimes import TrainingJob, runtime_for
from tests.conftest import wait_for
from tests.tuning_support import pid_alive, recorded_pids

# Starts a grandchild in its process group, records both pids, prints, then waits.
SPAWNING_TRAIN = """#!/usr/bin/env python3
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
with open("pids", "w") as f:
    f.write(f"{os.getpid()}\\n{child.pid}\\n")
print("started", flush=True)
time.sleep(300)
"""


def _image(tmp_path: Path) -> ResolvedImage:
    folder = tmp_path / "image"
    folder.mkdir()
    (folder / "train").write_text(SPAWNING_TRAIN)
    (folder / "train").chmod(0o755)
    return ResolvedImage(uri="test/spawning:train", kind="process", path=folder)


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    job = TrainingJob(image=_image(tmp_path), folder=tmp_path / "job", channels={}, hyperparameters={}, timeout_s=2)
    lines: list[str] = []
    outcome = runtime_for("process").train(job, lines.append)
    assert outcome.timed_out and not outcome.succeeded
    assert lines == ["started"]
    pids = recorded_pids(job.folder)
    assert len(pids) == 2
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the job's processes to be gone")


def test_a_killed_parent_takes_the_job_and_its_children_with_it(tmp_path: Path) -> None:
    """SIGKILL the process running the job (no cleanup code runs there): the entry point
    and the grandchild it started must not survive it."""
    image = _image(tmp_path)
    folder = tmp_path / "job"
    driver = textwrap.dedent(f"""
        import threading
        from pathlib import Path
        from pml.images import ResolvedImage
        from pml.runtimes import TrainingJob, runtime_for
        image = ResolvedImage(uri="x", kind="process", path=Path({str(image.path)!r}))
        job = TrainingJob(image=image, folder=Path({str(folder)!r}), channels={{}}, hyperparameters={{}})
        # In a thread, as Ray runs a function trainable.
        thread = threading.Thread(target=runtime_for("process").train, args=(job, print))
        thread.start()
        thread.join()
    """)
    parent = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "started"
        pids = recorded_pids(folder)
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10,
                 f"the orphaned job processes {pids} to be killed")
    finally:
        if parent.poll() is None:
            parent.kill()
