"""The tune step on a real local Ray and PostgreSQL with a fake image: early stopping,
failure reasons, metric series, the failed-trial budget, resources, and nothing left running."""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy import select

from pml.app import App
from pml.events import list_events
from pml.runs import get_run
from pml.store.tables import Trial
from pml.tuning.logs import trial_log_lines
from pml.tuning.trial import SERIES_FILE, STARTS_FILE
from pml.trials import trial_metric_series
from pml.tuning.tuner import tune_run
from tests.tuning_support import pid_alive, recorded_pids, run_ready_to_tune, tuning_config


def _trials(app: App, run_id: str) -> dict[str, Trial]:
    """Trials by their behaviour hyperparameter."""
    with app.session() as session:
        rows = session.scalars(select(Trial).where(Trial.run_id == run_id))
        return {row.hyperparameters["behaviour"]: row for row in rows}


def _grid(*behaviours: str) -> list[dict[str, object]]:
    return [{"name": "behaviour", "type": "categorical", "values": list(behaviours)}]


def test_early_stopping_failures_and_metric_series(tuning_app: App, tmp_path: Path) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    # One trial at a time, in grid order: three good trials give the median rule its samples
    # before the bad one runs.
    config = tuning_config(
        strategy="grid", maxTrials=7, maxParallelTrials=1, earlyStopping="median",
        searchSpace=_grid("good-a", "good-b", "good-c", "fail", "crash", "silent", "bad"),
    )
    run_id = run_ready_to_tune(tuning_app, tmp_path, account, config)
    assert tune_run(tuning_app, account, run_id), "tuning must succeed: good trials completed"
    trials = _trials(tuning_app, run_id)
    assert sorted(trials) == ["bad", "crash", "fail", "good-a", "good-b", "good-c", "silent"]
    statuses = {name: t.status for name, t in trials.items()}
    assert statuses == {"good-a": "COMPLETED", "good-b": "COMPLETED", "good-c": "COMPLETED",
                        "fail": "FAILED", "crash": "FAILED", "silent": "FAILED", "bad": "STOPPED_EARLY"}, statuses

    bad = trials["bad"]
    assert "median stopping rule" in (bad.failure_reason or ""), bad.failure_reason
    assert bad.objective == 0.1
    pids = recorded_pids(Path(bad.folder))
    assert len(pids) == 2, "the bad trial's entry point and its grandchild"
    assert not any(pid_alive(p) for p in pids), "an early-stopped trial's process group must be killed"

    fail = trials["fail"].failure_reason or ""
    assert fail.startswith("Training failed: behaviour says fail!") and len(fail) == 1024, fail[:80]
    assert "exited with code 3" in (trials["crash"].failure_reason or "")
    assert "boom, no reason given" in (trials["crash"].failure_reason or ""), "the log's tail explains a crash"
    silent = trials["silent"].failure_reason or ""
    assert silent.startswith("objective metric never reported") and "nothing to see" in silent, silent

    good = trials["good-a"]
    with tuning_app.session() as session:
        series = trial_metric_series(session, account, good.id)
    assert [p.value for p in series["score"]] == [0.9] * 4
    assert [p.step for p in series["score"]] == [0, 1, 2, 3]
    assert len(series["loss"]) == 4, "stderr lines are read too"
    assert good.final_metrics == {"score": 0.9, "loss": series["loss"][-1].value}
    with tuning_app.session() as session:
        bad_series = trial_metric_series(session, account, bad.id)
    assert 1 <= len(bad_series["score"]) < 60, "an early-stopped trial keeps the series it reported"

    lines = [line.text for line in trial_log_lines(tuning_app, account, good.id)]
    assert lines[0].startswith("hyperparameters ") and "epoch=4 score=0.9" in lines
    with tuning_app.session() as session:
        assert get_run(session, account, run_id).challenger_trial_id in {t.id for n, t in trials.items() if n.startswith("good")}


def test_spent_failure_budget_stops_the_experiment_and_fails_the_run(tuning_app: App, tmp_path: Path) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    config = tuning_config(
        strategy="grid", maxTrials=4, maxParallelTrials=1, maxFailedTrials=1,
        searchSpace=_grid("fail", "slow-a", "slow-b", "slow-c"),
        staticHyperparameters={"delay": "0.5", "steps": "8"},
    )
    run_id = run_ready_to_tune(tuning_app, tmp_path, account, config)
    assert not tune_run(tuning_app, account, run_id)
    with tuning_app.session() as session:
        run = get_run(session, account, run_id)
        assert run.status == "FAILED" and run.failed_step == "tune"
        assert "maxFailedTrials (1) spent" in (run.failure_reason or ""), run.failure_reason
        assert "behaviour says fail" in (run.failure_reason or "")
    trials = _trials(tuning_app, run_id)
    assert trials["fail"].status == "FAILED"
    assert len(trials) < 4 or any(t.status == "STOPPED" for t in trials.values()), (
        "a spent budget must stop the experiment, not let every trial run: "
        + str({n: t.status for n, t in trials.items()})
    )
    assert not any(t.status == "RUNNING" for t in trials.values())


def test_trials_take_their_resources_and_asha_stops_the_bad_one(tuning_app: App, tmp_path: Path) -> None:
    """Two CPUs in the local Ray and two CPUs per trial: trials never overlap, though no
    maxParallelTrials is set. ASHA stops the trial below the first rung's cutoff."""
    account = f"acct-{uuid.uuid4().hex[:8]}"
    config = tuning_config(
        strategy="grid", maxTrials=2, earlyStopping="asha", resources={"cpu": 2},
        searchSpace=_grid("good", "bad"),
    )
    run_id = run_ready_to_tune(tuning_app, tmp_path, account, config)
    assert tune_run(tuning_app, account, run_id)
    trials = _trials(tuning_app, run_id)
    assert trials["good"].status == "COMPLETED"
    assert trials["bad"].status == "STOPPED_EARLY" and "ASHA" in (trials["bad"].failure_reason or "")
    intervals = []
    for trial in trials.values():
        marks = dict(line.split() for line in (Path(trial.folder) / "intervals").read_text().splitlines())
        intervals.append((float(marks["start"]), float(marks.get("end", "inf"))))
    intervals.sort()
    assert intervals[0][1] <= intervals[1][0], f"trials holding 2 CPUs each ran at once: {intervals}"
    assert (Path(trials["good"].folder) / SERIES_FILE).exists()
    lines = [line.text for line in trial_log_lines(tuning_app, account, trials["good"].id)]
    # The trial's resources reach the job; a trial without GPUs sees none.
    assert "resources cpus=2 gpus=0 visible=" in lines, lines[:3]


def test_a_retried_trial_is_not_counted_against_the_failure_budget(tuning_app: App, tmp_path: Path) -> None:
    """trialRetries restarts a trial that failed; only a trial that fails for good spends
    maxFailedTrials (here 1, so one counted failure would fail the run)."""
    account = f"acct-{uuid.uuid4().hex[:8]}"
    config = tuning_config(
        strategy="grid", maxTrials=2, maxParallelTrials=1, maxFailedTrials=1, trialRetries=1,
        searchSpace=_grid("flaky", "good"),
    )
    run_id = run_ready_to_tune(tuning_app, tmp_path, account, config)
    assert tune_run(tuning_app, account, run_id), "a retried trial must not spend the failure budget"
    trials = _trials(tuning_app, run_id)
    assert {n: t.status for n, t in trials.items()} == {"flaky": "COMPLETED", "good": "COMPLETED"}
    flaky = trials["flaky"]
    assert len((Path(flaky.folder) / STARTS_FILE).read_text().splitlines()) == 2, "started twice"
    with tuning_app.session() as session:
        retried = [e for e in list_events(session, account, run_id=run_id) if e.type == "trial.retrying"]
    assert [e.data["trialId"] for e in retried] == [flaky.id], retried


def test_the_gpu_ray_assigns_reaches_the_training_job(tuning_app: App, tmp_path: Path) -> None:
    """The test Ray declares one GPU: a trial asking for it sees exactly that one."""
    account = f"acct-{uuid.uuid4().hex[:8]}"
    config = tuning_config(strategy="grid", maxTrials=1, resources={"cpu": 1, "gpu": 1},
                           searchSpace=_grid("good"))
    run_id = run_ready_to_tune(tuning_app, tmp_path, account, config)
    assert tune_run(tuning_app, account, run_id)
    good = _trials(tuning_app, run_id)["good"]
    lines = [line.text for line in trial_log_lines(tuning_app, account, good.id)]
    assert "resources cpus=1 gpus=1 visible=0" in lines, lines[:3]


def test_trials_run_side_by_side_by_default_as_the_cluster_holds_them(tuning_app: App, tmp_path: Path) -> None:
    """No maxParallelTrials: two one-CPU trials on the two-CPU test Ray run at the same time."""
    account = f"acct-{uuid.uuid4().hex[:8]}"
    config = tuning_config(strategy="grid", maxTrials=2, searchSpace=_grid("slow-a", "slow-b"),
                           staticHyperparameters={"delay": "0.5", "steps": "12"})
    run_id = run_ready_to_tune(tuning_app, tmp_path, account, config)
    assert tune_run(tuning_app, account, run_id)
    intervals = []
    for trial in _trials(tuning_app, run_id).values():
        marks = dict(line.split() for line in (Path(trial.folder) / "intervals").read_text().splitlines())
        intervals.append((float(marks["start"]), float(marks["end"])))
    intervals.sort()
    assert intervals[1][0] < intervals[0][1], f"the trials ran one after the other: {intervals}"
