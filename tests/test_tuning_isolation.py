"""Runs tuned side by side stay apart; a cancelled run stops tuning."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import redis

from pml.demo import digits_config
from pml.demo_data import write_demo_fhir
from pml.v1 import pml_pb2 as pb
from tests.conftest import REDIS_URL, Stack, wait_for
from tests.test_flow import finish


def test_two_accounts_tuning_at_once_never_share_trials(stack: Stack, tmp_path: Path) -> None:
    clients, models = [], []
    for owner in ("owner-a", "owner-b"):
        folder = tmp_path / owner
        write_demo_fhir(folder)
        client = stack.new_account(folder)
        config = digits_config("imgClf", max_trials=2)
        config["trainingApproach"]["staticHyperparameters"]["owner"] = owner  # the image ignores it
        clients.append(client)
        models.append(client.create_model(config))
    runs = [c.create_run(m.id).id for c, m in zip(clients, models)]
    results: dict[int, pb.Run] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, finish(stack, clients[i], runs[i]))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, owner in enumerate(("owner-a", "owner-b")):
        assert results[i].state == pb.RUN_STATE_COMPLETED
        trials = clients[i].list_trials(runs[i])
        assert len(trials) == 2
        for trial in trials:
            assert trial.hyperparameters["owner"] == owner
        run_folder = stack.home / "accounts" / clients[i].account / "runs" / runs[i] / "trials"
        for folder in run_folder.iterdir():
            written = json.loads((folder / "input" / "config" / "hyperparameters.json").read_text())
            assert written["owner"] == owner, f"{owner}'s run folder holds another run's trial"


def test_cancelling_a_run_stops_its_tuning(stack: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    write_demo_fhir(folder)
    client = stack.new_account(folder)
    config = digits_config("imgClf", max_trials=6)
    config["trainingApproach"]["maxParallelTrials"] = 1
    model = client.create_model(config)
    run_id = client.create_run(model.id).id
    for event in client.watch_run(run_id):
        if event.type == "trial.started":
            break
    client.runs.CancelRun(pb.CancelRunRequest(run_id=run_id), metadata=client.metadata)
    broker = redis.Redis.from_url(REDIS_URL)
    namespace = stack.app.settings.redis_namespace
    wait_for(lambda: broker.hlen(f"{namespace}:tune.msgs") == 0, 120, "the tuner to stop")
    run = client.get_run(run_id)
    assert run.state == pb.RUN_STATE_CANCELLED
    trials = client.list_trials(run_id)
    assert len(trials) < 6, "a cancelled run must not go on starting trials"
    assert not any(t.status == "RUNNING" for t in trials), [(t.number, t.status) for t in trials]
