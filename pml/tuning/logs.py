"""A trial's training log, read back from an offset and followed while the trial runs.

The process runtime writes every line of the image's stdout and stderr to the trial folder
as it arrives; this reads that file, so the gateway can stream it (and resume a stream).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pml.app import App
from pml.errors import NotFound, require_id
from pml.store.tables import Trial

LOG_FILE = Path("logs") / "train.log"
POLL_S = 0.2
# A line longer than this is returned in pieces (a log line must not hold the whole memory).
MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True)
class LogLine:
    text: str
    offset: int
    """Byte offset just after this line: pass it back to resume the stream there."""


def _trial(app: App, account_id: str, trial_id: str) -> tuple[Path, bool]:
    require_id("trial_id", trial_id)
    with app.session() as session:
        row = session.get(Trial, trial_id)
        if row is None or row.account_id != account_id:
            raise NotFound(f"trial {trial_id} not found")
        return Path(row.folder) / LOG_FILE, row.status == "RUNNING"


def trial_log_lines(
    app: App, account_id: str, trial_id: str, offset: int = 0, follow: bool = False, poll_s: float = POLL_S
) -> Iterator[LogLine]:
    """Yield the trial's log lines from byte ``offset``; with ``follow``, wait for new lines
    until the trial is no longer RUNNING (then drain what is left and stop).

    Raises NotFound for a trial of another account, as for one that does not exist.
    """
    if offset < 0:
        offset = 0
    path, running = _trial(app, account_id, trial_id)
    while True:
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(offset)
                while True:
                    raw = handle.readline(MAX_LINE_BYTES)
                    if not raw:
                        break
                    if not raw.endswith(b"\n") and running and len(raw) < MAX_LINE_BYTES:
                        break  # a line still being written: wait for its end
                    offset += len(raw)
                    yield LogLine(raw.decode("utf-8", errors="replace").rstrip("\n"), offset)
        if not follow or not running:
            return
        time.sleep(poll_s)
        # Read the status before the file: lines written before the trial ended are drained.
        _, running = _trial(app, account_id, trial_id)
