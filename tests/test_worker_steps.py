"""What the worker steps record when they go wrong, called directly on an App on SQLite
(no broker, no workers): a bug's message never reaches the run, a failed deploy is audited."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from pml import accounts, audit, models, runs
from pml.app import App
from pml.demo import digits_config
from pml.errors import StepFailed
from pml.serving.deploy import deploy_run
from pml.settings import Settings
from pml.store.tables import Event

ACCOUNT = "clinic-steps"
# What an unexpected exception's message may quote from a record.
PATIENT = "Jane Q. Patient"


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[App]:
    pml_app = App(Settings(home=tmp_path / "home"))
    with pml_app.session() as session:
        accounts.create_account(session, ACCOUNT, "", {"type": "folder", "path": str(tmp_path)})
    yield pml_app
    pml_app.close()


def new_run(app: App) -> str:
    with app.session() as session:
        model = models.create_model(session, ACCOUNT, digits_config("imgClf"))
        return runs.create_run(session, ACCOUNT, model.id).id


def failed_run(app: App, run_id: str) -> tuple[str, str, list[str]]:
    """The run's failed step and reason, and the reasons its events published."""
    with app.session() as session:
        run = runs.get_run(session, ACCOUNT, run_id)
        published = [
            str(e.data.get("reason", "")) for e in session.scalars(select(Event).where(Event.run_id == run_id))
        ]
        assert run.status == "FAILED", f"the step must fail the run, not leave it {run.status}"
        return run.failed_step or "", run.failure_reason or "", published


def test_an_unexpected_errors_message_never_reaches_the_run_or_the_log(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = new_run(app)

    def work() -> bool:
        raise ValueError(f"cannot read the birth date of {PATIENT} in DocumentReference/42")

    with caplog.at_level(logging.DEBUG):
        assert runs.run_step(app, ACCOUNT, run_id, "curate", work) is False
    step, reason, published = failed_run(app, run_id)
    assert step == "curate"
    assert reason == f"internal error in the curate step (ValueError); see the worker log for run {run_id}"
    assert all(PATIENT not in r for r in published), f"an event published the exception's message: {published}"
    logged = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert PATIENT not in logged, "the worker log must not hold the exception's message"
    assert "ValueError" in logged and "in work" in logged, "the log keeps the type and the frames, for the operator"


def test_pml_errors_keep_their_own_messages(app: App) -> None:
    run_id = new_run(app)

    def work() -> bool:
        raise StepFailed("image 'x' is not in the image registry")

    runs.run_step(app, ACCOUNT, run_id, "tune", work)
    assert failed_run(app, run_id)[:2] == ("tune", "image 'x' is not in the image registry")


def test_a_failed_deploy_is_audited_for_the_approver(app: App) -> None:
    run_id = new_run(app)
    with app.session() as session:
        run = runs.get_run(session, ACCOUNT, run_id)
        run.status, run.artifact_sha256 = "COMPLETED", "0" * 64
        _, deploy = runs.approve_run(session, ACCOUNT, run_id, "approved", actor="key:k-1")
    assert deploy, "the demo config deploys to the cloud"

    deploy_run(app, ACCOUNT, run_id)  # the inference image is not registered here: the deploy fails

    with app.session() as session:
        assert runs.get_run(session, ACCOUNT, run_id).deploy_status == "FAILED"
        entries = [e for e in audit.list_entries(session, ACCOUNT) if e.action == "run.deploy"]
        assert [(e.actor, e.target_type, e.target_id, e.outcome, e.interface) for e in entries] == [
            ("key:k-1", "run", run_id, "FAILED_PRECONDITION", "worker")
        ], "one deploy entry, for the approver's key, with the error's status"
        assert audit.to_audit_event(entries[0])["action"] == "E"
