"""A tune worker killed mid-experiment: the redelivered message resumes the Ray Tune
experiment in another worker; finished trials are not run again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from pml.app import App
from pml.runs import get_run
from pml.settings import Settings
from pml.store.tables import Trial
from tests.conftest import REDIS_URL, ROOT, wait_for
from tests.tuning_support import (
    environment_without_pml,
    pid_alive,
    recorded_pids,
    run_ready_to_tune,
    starts,
    tuning_config,
)

MAX_TRIALS = 3


def _terminated_in_saved_state(run_folder: Path) -> set[str]:
    """Ray trial ids the experiment state on disk holds as finished (what a resume sees)."""
    done: set[str] = set()
    for path in (run_folder / "ray" / "experiment").glob("experiment_state-*.json"):
        try:
            state = json.loads(path.read_text())
        except ValueError:
            continue  # being written
        for entry in state.get("trial_data", []):
            trial = json.loads(entry[0])
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


class Workers:
    """`pml worker --queues tune` processes on this test's own Redis namespace."""

    def __init__(self, settings: Settings, home: Path):
        # The workers see only this test's settings, never the caller's PML_*.
        self.env = {
            **environment_without_pml(),
            "PML_HOME": str(settings.home), "PML_DATABASE_URL": str(settings.database_url),
            "PML_REDIS_URL": REDIS_URL, "PML_REDIS_NAMESPACE": settings.redis_namespace, "PML_RAY_NUM_CPUS": "2",
        }
        self.home = home
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "w")
        worker = subprocess.Popen(
            [sys.executable, "-m", "pml.cli", "worker", "--queues", "tune", "--threads", "1"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.started:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()


@pytest.fixture
def resume_setup(tmp_path: Path, postgres_url: str, redis_namespace: str) -> Iterator[tuple[App, Workers]]:
    settings = Settings(home=tmp_path / "home", database_url=postgres_url, redis_url=REDIS_URL,
                        redis_namespace=f"{redis_namespace}-resume")
    app = App(settings)
    workers = Workers(settings, tmp_path)
    yield app, workers
    workers.stop_all()
    app.engine.dispose()


@pytest.mark.parametrize("strategy", ["random", "bayesian"])
def test_killed_tune_worker_resumes_the_experiment_without_rerunning_finished_trials(
    resume_setup: tuple[App, Workers], tmp_path: Path, strategy: str
) -> None:
    """Bayesian too: the restored experiment brings back Optuna's searcher with its history."""
    app, workers = resume_setup
    account = f"acct-{uuid.uuid4().hex[:8]}"
    config = tuning_config(
        strategy=strategy, maxTrials=MAX_TRIALS, maxParallelTrials=1, seed=3,
        searchSpace=[{"name": "x", "type": "continuous", "min": 0, "max": 1}],
        staticHyperparameters={"behaviour": "slow", "delay": "0.4", "steps": "8"},
    )
    run_id = run_ready_to_tune(app, tmp_path, account, config)
    run_folder = app.account_home(account) / "runs" / run_id
    first = workers.start("worker-1")
    app.enqueue("tune", account, run_id)

    def running_after_a_saved_finish() -> tuple[set[str], Trial] | None:
        done = _terminated_in_saved_state(run_folder)
        if not done:
            return None
        with app.session() as session:
            running = session.scalars(select(Trial).where(Trial.run_id == run_id, Trial.status == "RUNNING")).first()
        if running is None or not recorded_pids(Path(running.folder)):
            return None
        return done, running

    done, running = wait_for(running_after_a_saved_finish, 180, "a finished trial and a running one")
    killed_pids = recorded_pids(Path(running.folder))
    first.send_signal(signal.SIGKILL)
    first.wait()
    wait_for(lambda: not any(pid_alive(p) for p in killed_pids), 60,
             "the killed worker's training processes to be gone")

    workers.start("worker-2")  # the broker redelivers the unacknowledged message to it

    def tuned() -> bool:
        with app.session() as session:
            return get_run(session, account, run_id).status != "TUNING"

    wait_for(tuned, 240, "the resumed run to finish tuning")
    with app.session() as session:
        run = get_run(session, account, run_id)
        assert run.status == "EVALUATING", (run.status, run.failure_reason)
        trials = list(session.scalars(select(Trial).where(Trial.run_id == run_id)))
    assert len(trials) == MAX_TRIALS, [(t.number, t.status, t.failure_reason) for t in trials]
    assert all(t.status == "COMPLETED" for t in trials), [(t.number, t.status, t.failure_reason) for t in trials]
    by_ray_id = {t.id.removeprefix(f"{run_id}-"): t for t in trials}
    for ray_id in done:
        assert starts(Path(by_ray_id[ray_id].folder)) == 1, f"finished trial {ray_id} was run again"
    assert starts(Path(running.folder)) == 2, "the trial running when the worker died runs again, once"
    assert sum(starts(Path(t.folder)) for t in trials) == MAX_TRIALS + 1
