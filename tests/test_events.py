"""Event streams: replay then live with no gap and no duplicate, reconnects, filters, accounts."""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import grpc
import pytest
from sqlalchemy import event as sa_event

from pml import events
from pml.app import App
from pml.client import PmlClient
from pml.demo import digits_config
from pml.demo_data import write_demo_fhir
from pml.events import list_events
from pml.gateway.server import build_server
from pml.settings import Settings
from pml.v1 import pml_pb2 as pb
from tests.conftest import Stack, wait_for

STREAM_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fhir")
    write_demo_fhir(folder)
    return folder


class Collector:
    """Reads a server stream in a thread, keeping every event it gets."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.events: list[pb.Event] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for item in self.stream:
                self.events.append(item)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def ids(self) -> list[int]:
        return [e.id for e in self.events]

    def until(self, what: str, done: Callable[[list[pb.Event]], bool]) -> list[pb.Event]:
        wait_for(lambda: self.error is not None or done(list(self.events)), STREAM_TIMEOUT_S, what, interval=0.02)
        assert self.error is None, f"the stream ended with {self.error}"
        return list(self.events)

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(10)


def publish(app: App, account_id: str, type: str = "trial.metric", run_id: str | None = None,
            model_id: str | None = None, **data: Any) -> int:
    """One event in its own transaction; its id once committed."""
    with app.session() as session:
        row = events.publish(session, account_id, type, run_id=run_id, model_id=model_id, data=data)
    return row.id


def sql_ids(app: App, account_id: str, run_id: str | None = None) -> list[int]:
    with app.session() as session:
        return [e.id for e in list_events(session, account_id, run_id=run_id, limit=100_000)]


def failing_run(client: PmlClient) -> tuple[str, str]:
    """A real run that curates, then fails at tuning (its image is unknown): quick and complete."""
    model = client.create_model(digits_config("imgClf", train_image="registry.example/unknown:1"))
    return model.id, client.create_run(model.id).id


def watch_run(client: PmlClient, run_id: str, after: int = 0) -> Collector:
    return Collector(client.events.WatchRun(pb.WatchRunRequest(run_id=run_id, after_event_id=after),
                                            metadata=client.metadata))


def watch_events(client: PmlClient, after: int = 0, **filter: Any) -> Collector:
    request = pb.WatchEventsRequest(filter=pb.EventFilter(**filter), after_event_id=after)
    return Collector(client.events.WatchEvents(request, metadata=client.metadata))


def test_watch_run_replays_history_then_follows_live_without_gap_or_duplicate(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    _, run_id = failing_run(client)
    for _ in client.watch_run(run_id):
        pass
    history = sql_ids(stack.app, client.account, run_id)
    assert len(history) >= 4, "a run that curated and failed has at least its four state changes"
    watcher = watch_run(client, run_id)
    try:
        watcher.until("the replay", lambda got: len(got) >= len(history))
        live = [publish(stack.app, client.account, run_id=run_id, step=i) for i in range(20)]
        publish(stack.app, client.account, run_id=None, step=-1)  # another run's event: not in this stream
        got = watcher.until("the live events", lambda got: bool(got) and got[-1].id >= live[-1])
    finally:
        watcher.close()
    ids = [e.id for e in got]
    assert ids == sorted(set(ids)), f"ids must be strictly increasing, no duplicate: {ids}"
    assert ids == history + live == sql_ids(stack.app, client.account, run_id)


def test_reconnecting_with_the_last_id_mid_run_misses_and_repeats_nothing(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    _, run_id = failing_run(client)
    first = watch_run(client, run_id)
    try:
        before = first.until("the first events of the run", lambda got: len(got) >= 2)
    finally:
        first.close()
    last = before[-1].id
    assert client.get_run(run_id).state not in (pb.RUN_STATE_FAILED, pb.RUN_STATE_COMPLETED), \
        "the reconnect must happen while the run still goes"
    after = list(client.watch_run(run_id, after_event_id=last))
    ids = [e.id for e in before] + [e.id for e in after]
    assert len(ids) == len(set(ids)), f"an event came twice: {ids}"
    assert ids == sql_ids(stack.app, client.account, run_id), "the two connections together are the history"
    states = [json.loads(e.data_json)["status"] for e in before + after if e.type == "run.state"]
    assert states == ["PENDING", "CURATING", "TUNING", "FAILED"]
    types = {e.type for e in before + after}
    assert {"curation.progress", "run.curated"} <= types, types


def test_watch_events_filters_by_type_run_and_model(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    model_a, run_a = failing_run(client)
    model_b, run_b = failing_run(client)
    for run_id in (run_a, run_b):
        for _ in client.watch_run(run_id):
            pass
    publish(stack.app, client.account, "trial.metric", run_id=run_a, model_id=model_a, step=1)
    publish(stack.app, client.account, "trial.finished", run_id=run_b, model_id=model_b, status="COMPLETED")
    with stack.app.session() as session:
        everything = list_events(session, client.account, limit=100_000)
    cases = [
        ({"types": ["run.state"]}, lambda e: e.type == "run.state"),
        ({"run_id": run_b}, lambda e: e.run_id == run_b),
        ({"model_id": model_a}, lambda e: e.model_id == model_a),
        ({"types": ["run.state", "trial.finished"], "model_id": model_b},
         lambda e: e.type in ("run.state", "trial.finished") and e.model_id == model_b),
    ]
    for filter, keep in cases:
        expected = [e.id for e in everything if keep(e)]
        assert expected, f"the case {filter} must have something to find"
        watcher = watch_events(client, **filter)
        try:
            got = watcher.until(f"the events of {filter}", lambda got: len(got) >= len(expected))
            sentinel = publish(stack.app, client.account, "trial.finished", run_id=run_b, model_id=model_b,
                               status="COMPLETED")
            if keep(SimpleNamespace(type="trial.finished", run_id=run_b, model_id=model_b)):
                expected.append(sentinel)
                got = watcher.until("the live event", lambda got: got[-1].id == sentinel)
        finally:
            watcher.close()
        assert [e.id for e in got] == expected, f"filter {filter}"
        everything.append(SimpleNamespace(id=sentinel, type="trial.finished", run_id=run_b, model_id=model_b))


def test_another_accounts_run_and_model_are_not_found_and_its_events_never_shown(
    stack: Stack, small_folder: Path,
) -> None:
    owner = stack.new_account(small_folder)
    stranger = stack.new_account(small_folder)
    model_id, run_id = failing_run(owner)
    for call in (
        lambda: list(stranger.watch_run(run_id)),
        lambda: next(iter(stranger.events.WatchEvents(
            pb.WatchEventsRequest(filter=pb.EventFilter(run_id=run_id)), metadata=stranger.metadata))),
        lambda: next(iter(stranger.events.WatchEvents(
            pb.WatchEventsRequest(filter=pb.EventFilter(model_id=model_id)), metadata=stranger.metadata))),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(stranger.events.WatchEvents(
            pb.WatchEventsRequest(filter=pb.EventFilter(types=["run.sate"])), metadata=stranger.metadata)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    watcher = watch_events(stranger)
    try:
        publish(stack.app, owner.account, run_id=run_id, model_id=model_id, step=1)
        sentinel = publish(stack.app, stranger.account, step=2)
        got = watcher.until("the stranger's own event", lambda got: bool(got) and got[-1].id == sentinel)
    finally:
        watcher.close()
    assert [e.id for e in got] == sql_ids(stack.app, stranger.account)
    assert not {e.run_id for e in got} & {run_id}


def test_concurrent_interleaved_transactions_reach_a_watcher_once_each_in_order(
    stack: Stack, small_folder: Path,
) -> None:
    """Transactions commit in another order than they start; the follower still sees each id once."""
    client = stack.new_account(small_folder)
    watcher = watch_events(client)
    published: list[int] = []
    lock = threading.Lock()

    def slow_commit(_session: Any) -> None:
        time.sleep(random.uniform(0, 0.01))  # widens the window between the insert and the commit

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(25):
            with stack.app.session() as session:
                sa_event.listen(session, "before_commit", slow_commit)
                rows = [events.publish(session, client.account, "trial.metric", data={"writer": seed, "step": i})
                        for _ in range(rng.choice((1, 1, 2)))]
                time.sleep(rng.uniform(0, 0.005))
            with lock:
                published.extend(r.id for r in rows)

    try:
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sentinel = publish(stack.app, client.account, step=-1)
        got = watcher.until("every published event", lambda got: bool(got) and got[-1].id >= sentinel)
    finally:
        watcher.close()
    ids = [e.id for e in got]
    assert len(published) >= 150
    assert ids == sorted(published + [sentinel]), "each committed event exactly once, in id order"
    assert ids == sql_ids(stack.app, client.account)


def test_a_run_and_its_deployment_publish_every_kind_of_progress(stack: Stack, small_folder: Path) -> None:
    client = stack.new_account(small_folder)
    model = client.create_model(digits_config("imgClf", max_trials=1))
    watcher = watch_events(client, model_id=model.id)
    try:
        run_id = client.create_run(model.id).id
        for _ in client.watch_run(run_id):
            pass
        assert client.get_run(run_id).state == pb.RUN_STATE_COMPLETED, stack.worker_log_tail()
        client.approve(run_id)
        got = watcher.until("the deployment", lambda got: any(e.type.startswith("deployment.s") for e in got))
    finally:
        watcher.close()
    types = {e.type for e in got}
    wanted = {
        "run.state", "curation.progress", "run.curated", "trial.started", "trial.metric", "trial.finished",
        "run.tuned", "run.evaluated", "run.approval", "deployment.deploying", "deployment.serving",
    }
    assert wanted <= types, f"missing: {sorted(wanted - types)}"
    for item in got:
        assert set(json.loads(item.data_json)) <= {
            "status", "resourcesRead", "skipped", "snapshotId", "examples", "trialId", "number", "hyperparameters",
            "objective", "step", "reason", "challengerTrialId", "trials", "challenger", "champion", "championRunId",
            "decision", "approvalId", "deploymentId", "failedStep", "replacedBy", "step",
        }, f"unexpected data in {item.type}: {item.data_json}"


def test_embedded_mode_streams_without_redis(tmp_path: Path) -> None:
    admin_key = secrets.token_urlsafe(16)
    app = App(Settings(home=tmp_path / "home", admin_key=admin_key))
    assert app.settings.embedded_broker
    server, port = build_server(app, "127.0.0.1:0")
    try:
        admin = PmlClient(f"127.0.0.1:{port}", admin_key=admin_key)
        admin.create_account("embedded", {"type": "folder", "path": str(tmp_path)})
        client = PmlClient(f"127.0.0.1:{port}", account="embedded", api_key=admin.create_api_key("embedded"))
        earlier = publish(app, "embedded", step=0)
        watcher = watch_events(client, types=["trial.metric"])
        try:
            watcher.until("the replay", lambda got: len(got) == 1)
            threads = [threading.Thread(target=lambda n=n: [publish(app, "embedded", step=n) for _ in range(10)])
                       for n in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sentinel = publish(app, "embedded", step=-1)
            got = watcher.until("the live events", lambda got: got[-1].id >= sentinel)
        finally:
            watcher.close()
        ids = [e.id for e in got]
        assert ids[0] == earlier and ids == sorted(set(ids)) and len(ids) == 32
        assert ids == sql_ids(app, "embedded")
        admin.close()
        client.close()
    finally:
        server.stop(grace=1)
        app.close()


def test_the_redis_stream_carries_every_event_and_stays_bounded(stack: Stack, small_folder: Path) -> None:
    import redis

    from pml.eventbus import EventBus
    from pml.events import Announcement
    from tests.conftest import REDIS_URL

    client = stack.new_account(small_folder)
    ids = [publish(stack.app, client.account, model_id="m-stream", step=i) for i in range(5)]
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    stream_key = f"{stack.app.settings.redis_namespace}:events"
    entries = {int(fields["id"]): fields for _, fields in r.xrange(stream_key)}
    for step, event_id in enumerate(ids):
        entry = entries[event_id]
        assert (entry["account"], entry["type"], entry["model"]) == (client.account, "trial.metric", "m-stream")
        assert json.loads(entry["data"]) == {"step": step}, entry
        assert entry["time"].startswith("20"), entry

    # Trimmed as it grows: Redis trims whole nodes (100 entries each by default) with MAXLEN ~.
    key_space = f"{stack.app.settings.redis_namespace}-bounded"
    bus = EventBus(Settings(redis_url=REDIS_URL, redis_namespace=key_space, event_stream_maxlen=50))
    try:
        for start in range(0, 1000, 100):
            bus.committed([Announcement(i, "acct", "trial.metric") for i in range(start, start + 100)])
        length = r.xlen(f"{key_space}:events")
        assert 50 <= length <= 150, f"the stream holds {length} entries for a bound of 50"
    finally:
        bus.close()
        r.delete(f"{key_space}:events")


def test_a_watch_rides_out_a_gateway_restart_missing_and_repeating_nothing(tmp_path: Path) -> None:
    """The client's reconnect (what ``pml runs watch`` uses): the gateway stops mid-run, events
    are published while it is down, it comes back on the same port; the watcher gets each once."""
    from pml import models, runs

    admin_key = secrets.token_urlsafe(16)
    app = App(Settings(home=tmp_path / "home", admin_key=admin_key))
    server, port = build_server(app, "127.0.0.1:0")
    admin = PmlClient(f"127.0.0.1:{port}", admin_key=admin_key)
    admin.create_account("restart", {"type": "folder", "path": str(tmp_path)})
    client = PmlClient(f"127.0.0.1:{port}", account="restart", api_key=admin.create_api_key("restart"))
    with app.session() as session:
        model = models.create_model(session, "restart", digits_config("imgClf"))
        run_id = runs.create_run(session, "restart", model.id).id
    got: list[pb.Event] = []
    failure: list[BaseException] = []

    def follow() -> None:
        try:
            got.extend(client.watch_run(run_id, reconnect_s=30))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failure.append(exc)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    try:
        before = [publish(app, "restart", run_id=run_id, step=i) for i in range(3)]
        wait_for(lambda: before[-1] in [e.id for e in got], STREAM_TIMEOUT_S, "the events before the restart")
        server.stop(grace=0).wait()
        while_down = [publish(app, "restart", run_id=run_id, step=10 + i) for i in range(3)]
        server, _ = build_server(app, f"127.0.0.1:{port}")
        with app.session() as session:
            runs.set_status(session, runs.get_run(session, "restart", run_id), runs.RunStatus.COMPLETED)
        after = sql_ids(app, "restart", run_id=run_id)[-1]
        watcher.join(STREAM_TIMEOUT_S)
        assert not watcher.is_alive(), "the watch did not end at the terminal state"
        assert not failure, f"the watch failed: {failure[0]!r}"
        ids = [e.id for e in got]
        assert ids == sql_ids(app, "restart", run_id=run_id), "missed or repeated events"
        assert set(before + while_down + [after]) <= set(ids) and ids[-1] == after

        # Resuming after the end: what follows the id given, up to the end, then it stops —
        # also when the id is the end itself or lies past it (what a script resumes with).
        late = publish(app, "restart", "deployment.serving", run_id=run_id)
        for resume_at, expected in ((while_down[0], ids[ids.index(while_down[0]) + 1:]), (after, []), (late, [])):
            resumed: list[list[int]] = []
            reader = threading.Thread(target=lambda a=resume_at: resumed.append(
                [e.id for e in client.watch_run(run_id, after_event_id=a)]), daemon=True)
            reader.start()
            reader.join(STREAM_TIMEOUT_S)
            assert not reader.is_alive(), f"a watch resumed after {resume_at} of an ended run did not end"
            assert resumed == [expected]
    finally:
        admin.close()
        client.close()
        server.stop(grace=0)
        app.close()
