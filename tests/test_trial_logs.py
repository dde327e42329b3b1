"""A trial's log read back from an offset, and followed until the trial ends."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from pml.accounts import create_account
from pml.app import App
from pml.errors import NotFound
from pml.models import create_model
from pml.runs import create_run
from pml.store.tables import Trial
from pml.tuning.logs import trial_log_lines
from tests.tuning_support import tuning_config


def _running_trial(app: App, folder: Path) -> tuple[str, str]:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    with app.session() as session:
        create_account(session, account, account, {"type": "folder", "path": str(folder)})
        model = create_model(session, account, tuning_config())
        run = create_run(session, account, model.id)
        trial = Trial(id=f"{run.id}-t1", account_id=account, run_id=run.id, number=1, hyperparameters={},
                      folder=str(folder), status="RUNNING")
        session.add(trial)
    return account, trial.id


def test_follow_yields_lines_as_written_and_ends_with_the_trial(tuning_app: App, tmp_path: Path) -> None:
    account, trial_id = _running_trial(tuning_app, tmp_path)
    log = tmp_path / "logs" / "train.log"

    def write() -> None:
        time.sleep(0.3)  # the reader starts before the file exists
        log.parent.mkdir(parents=True)
        with open(log, "w") as handle:
            for i in range(5):
                handle.write(f"line {i}")
                handle.flush()
                time.sleep(0.05)  # a line is read only once it is whole
                handle.write("\n")
                handle.flush()
        with tuning_app.session() as session:
            session.get(Trial, trial_id).status = "COMPLETED"  # type: ignore[union-attr]

    writer = threading.Thread(target=write)
    writer.start()
    got = list(trial_log_lines(tuning_app, account, trial_id, follow=True, poll_s=0.05))
    writer.join()
    assert [line.text for line in got] == [f"line {i}" for i in range(5)]

    # Resume after the second line: the offset it came with.
    rest = list(trial_log_lines(tuning_app, account, trial_id, offset=got[1].offset))
    assert [line.text for line in rest] == ["line 2", "line 3", "line 4"]
    assert rest[-1].offset == log.stat().st_size


def test_another_accounts_trial_log_is_not_found(tuning_app: App, tmp_path: Path) -> None:
    _, trial_id = _running_trial(tuning_app, tmp_path)
    with pytest.raises(NotFound):
        list(trial_log_lines(tuning_app, "acct-someone-else", trial_id))
