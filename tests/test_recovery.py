"""An embedded pml that starts again picks up what its in-memory queues lost."""

from __future__ import annotations

import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dramatiq
import pytest

from pml import accounts, events, models, runs, webhooks
from pml.app import App
from pml.demo import digits_config
from pml.demo_data import write_demo_fhir
from pml.recovery import resume_unfinished
from pml.runs import RunStatus
from pml.settings import Settings
from pml.store.tables import Deployment
from pml.workers import load_actors, start_workers
from tests.conftest import wait_for

ACCOUNT = "restarted"


@pytest.fixture()
def app(tmp_path: Path) -> App:
    app = App(Settings(home=tmp_path / "home"))
    assert app.settings.embedded_broker
    folder = tmp_path / "fhir"
    write_demo_fhir(folder)
    with app.session() as session:
        accounts.create_account(session, ACCOUNT, ACCOUNT, {"type": "folder", "path": str(folder)})
    yield app
    app.close()


def queued(app: App) -> list[tuple[str, tuple[str, ...]]]:
    """(queue, args) of every message waiting in the in-memory broker, delayed ones included."""
    found = []
    for queue in app.broker.queues.values():
        for encoded in list(queue.queue):
            message = dramatiq.Message.decode(encoded)
            found.append((message.queue_name, tuple(message.args)))
    return sorted(found)


def run_in(app: App, model_id: str, status: RunStatus, deploy_status: str | None = None) -> str:
    with app.session() as session:
        run = runs.create_run(session, ACCOUNT, model_id)
        run.status, run.deploy_status = status.value, deploy_status
        return run.id


class Ping(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/ping" else 404)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def serving(app: App, model_id: str, run_id: str, endpoint: str, status: str = "SERVING", pid: int | None = None) -> str:
    with app.session() as session:
        row = Deployment(account_id=ACCOUNT, model_id=model_id, run_id=run_id, status=status, endpoint=endpoint, pid=pid)
        session.add(row)
        session.flush()
        return row.id


def test_each_unfinished_run_deployment_and_delivery_gets_its_step_again(app: App) -> None:
    load_actors(app.broker)  # declares the queues, as a starting pml serve does; no worker consumes
    with app.session() as session:
        model_id = models.create_model(session, ACCOUNT, digits_config("imgClf")).id
        webhooks.create_subscription(session, ACCOUNT, "http://127.0.0.1:9/hook", ["model.updated"])
    waiting = {
        "curate": [run_in(app, model_id, RunStatus.PENDING), run_in(app, model_id, RunStatus.CURATING)],
        "tune": [run_in(app, model_id, RunStatus.TUNING)],
        "evaluate": [run_in(app, model_id, RunStatus.EVALUATING)],
        "deploy": [run_in(app, model_id, RunStatus.COMPLETED, "PENDING"),
                   run_in(app, model_id, RunStatus.COMPLETED, "DEPLOYING")],
    }
    # The process died while this server started: the server is still up, its row STARTING.
    half_started = subprocess.Popen(["sleep", "300"], start_new_session=True)
    starting = serving(app, model_id, waiting["deploy"][1], "http://127.0.0.1:9", "STARTING", half_started.pid)
    for status, deploy in ((RunStatus.COMPLETED, None), (RunStatus.FAILED, None), (RunStatus.CANCELLED, None)):
        run_in(app, model_id, status, deploy)  # finished: nothing to do
    # Deployed: one server still answers (left alone), one died with the last process (deployed again).
    alive_server = ThreadingHTTPServer(("127.0.0.1", 0), Ping)
    threading.Thread(target=alive_server.serve_forever, daemon=True).start()
    serving(app, model_id, run_in(app, model_id, RunStatus.COMPLETED, "DEPLOYED"),
            f"http://127.0.0.1:{alive_server.server_address[1]}")
    dead_run = run_in(app, model_id, RunStatus.COMPLETED, "DEPLOYED")
    serving(app, model_id, dead_run, "http://127.0.0.1:9")
    waiting["deploy"].append(dead_run)
    with app.session() as session:
        events.publish(session, ACCOUNT, "model.updated", model_id=model_id)
    with app.session() as session:
        (delivery,) = webhooks.list_deliveries(session, ACCOUNT, webhooks.list_subscriptions(session, ACCOUNT)[0].id)
    app.broker.flush_all()  # what a restart loses

    try:
        resumed = resume_unfinished(app)
    finally:
        alive_server.shutdown()

    expected = sorted([(queue, (ACCOUNT, object_id)) for queue, ids in waiting.items() for object_id in ids]
                      + [("notify", (ACCOUNT, delivery.id))])
    assert queued(app) == expected
    assert (resumed.curate, resumed.tune, resumed.evaluate, resumed.deploy, resumed.notify) == (2, 1, 1, 3, 1)
    try:
        half_started.wait(10)
    except subprocess.TimeoutExpired:
        half_started.kill()
        raise AssertionError("the half-started server was left running") from None
    with app.session() as session:
        assert session.get(Deployment, starting).status == "FAILED"


def test_a_run_whose_message_was_lost_moves_on_once_resumed(app: App) -> None:
    """For real: the run waits in PENDING with no message; after the resume the embedded
    workers curate it and tune it (which fails at once here: its image is not registered)."""
    with app.session() as session:
        model_id = models.create_model(session, ACCOUNT, digits_config("imgClf", train_image="registry.example/none:1")).id
    run_id = run_in(app, model_id, RunStatus.PENDING)
    worker = start_workers(app, threads=1)
    try:
        resume_unfinished(app)

        def finished() -> object:
            with app.session() as session:
                run = runs.get_run(session, ACCOUNT, run_id)
                return run if run.status in runs.TERMINAL else None

        run = wait_for(finished, 120, "the resumed run to end")
        assert (run.status, run.failed_step) == ("FAILED", "tune"), run.failure_reason
        assert run.snapshot_id, "curation never ran"
        assert "registry.example/none:1" in (run.failure_reason or "")
    finally:
        worker.stop()
