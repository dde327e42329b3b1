"""The tune step: a Ray Tune experiment over the search space; the best trial is the challenger.

Trials run the training image through the runtime its registry entry names. The driver's
callback records every trial and its progress as it happens, so clients can watch.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

# Tune's console tables and SIGINT handler are for scripts, not for a worker service.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
# Save the experiment state at every step of Tune's loop (not every 10 s or more): a worker
# killed right after a trial finished must not run that trial again when the run resumes.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")

from ray import tune  # noqa: E402
from ray.tune import Callback  # noqa: E402
from sqlalchemy import delete, func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from pml import events
from pml.app import App, current_app
from pml.artifacts import store_model
from pml.datasets.channels import write_channel
from pml.datasets.snapshot import cv_folds, load_manifest
from pml.errors import StepFailed
from pml.images import resolve_image
from pml.runs import RunStatus, get_run, run_step, set_status
from pml.runtimes.base import DEFAULT_MEMORY_BYTES
from pml.schemas.config import ModelConfig, TrainingApproach
from pml.settings import Settings
from pml.store.tables import Trial, TrialMetric, utcnow
from pml.tuning.strategy import EARLY_STOPPING_RULES, param_space, tune_config
from pml.tuning.trial import FAILURE_FILE, METRICS_FILE, SERIES_FILE, TrialSpec, run_trial

log = logging.getLogger(__name__)
_ray_lock = threading.Lock()
# Ray Tune keeps process-wide state (its trainable registry above all): two experiments at
# once in one process were seen to mix their trials' settings, so a process runs one at a
# time. Operators scale tuning with worker processes (`pml worker --queues tune --processes N`).
_experiment_lock = threading.Lock()


def ensure_ray(settings: Settings, attempts: int = 3) -> None:
    """Start (or join) Ray once per process.

    A local Ray's first start sometimes times out waiting for its GCS on a busy machine
    (seen here); a second start then works, so a few attempts are made before giving up.
    """
    import ray

    with _ray_lock:
        for attempt in range(1, attempts + 1):
            if ray.is_initialized():
                return
            try:
                ray.init(
                    address=settings.ray_address,
                    num_cpus=None if settings.ray_address else settings.ray_num_cpus,
                    num_gpus=None if settings.ray_address else settings.ray_num_gpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
                return
            except (RuntimeError, ConnectionError, TimeoutError) as exc:
                log.warning("starting Ray failed (attempt %d of %d): %s", attempt, attempts, exc)
                ray.shutdown()
                if attempt == attempts:
                    raise


def shutdown_ray() -> None:
    """Leave Ray cleanly; a process that exits without it waits a minute for Ray's GCS."""
    import ray

    with _ray_lock:
        if ray.is_initialized():
            ray.shutdown()


def _trial_number(trial_id: str) -> int:
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) + 1 if tail.isdigit() else 0


def _failed_trials(session: Session, account_id: str, run_id: str) -> int:
    return session.scalar(
        select(func.count()).select_from(Trial).where(
            Trial.account_id == account_id, Trial.run_id == run_id, Trial.status == "FAILED"
        )
    ) or 0


def _budget_spent(session: Session, account_id: str, run_id: str, max_failed: int | None) -> bool:
    return max_failed is not None and _failed_trials(session, account_id, run_id) >= max_failed


def _crash_reason(folder: Path) -> str:
    """A trial that died without a reason of its own (its Ray worker crashed): the log's tail."""
    log_path = folder / "logs" / "train.log"
    tail = log_path.read_text(errors="replace").splitlines()[-5:] if log_path.exists() else []
    return "the trial process crashed" + (f"; last log lines: {' | '.join(tail)}" if tail else "")


def _read_series(folder: Path) -> list[dict[str, Any]]:
    path = folder / SERIES_FILE
    if not path.exists():
        return []
    points = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            points.append(json.loads(line))
        except ValueError:
            continue  # a line cut short when the trial was killed
    return points


def _store_series(session: Session, account_id: str, trial_id: str, points: list[dict[str, Any]]) -> None:
    """Replace the trial's stored series with ``points`` (a restarted trial starts its series again)."""
    session.execute(delete(TrialMetric).where(TrialMetric.account_id == account_id, TrialMetric.trial_id == trial_id))
    seen: set[tuple[str, int]] = set()
    for p in points:
        key = (str(p["metric"]), int(p["step"]))
        if key in seen:
            continue
        seen.add(key)
        session.add(TrialMetric(
            account_id=account_id, trial_id=trial_id, metric=key[0], step=key[1], value=float(p["value"]),
            reported_at=dt.datetime.fromtimestamp(float(p["time"]), dt.timezone.utc),
        ))


class TrialRecorder(Callback):
    """Writes trials and their events to the store from the driver, as Ray Tune reports them."""

    def __init__(self, app: App, account_id: str, run_id: str, spec: TrialSpec, approach: TrainingApproach):
        self.app, self.account_id, self.run_id, self.spec = app, account_id, run_id, spec
        self.early_stopping = approach.early_stopping
        self.max_failed = approach.max_failed_trials

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles its callbacks with the experiment state; the App (engine, broker)
        # stays behind and the process's current App stands in when unpickled.
        return {k: v for k, v in self.__dict__.items() if k != "app"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.app = current_app()

    def _id(self, trial: Any) -> str:
        return f"{self.run_id}-{trial.trial_id}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        hyperparameters = self.spec.hyperparameters(trial.config)
        with self.app.session() as session:
            row = session.get(Trial, self._id(trial))
            if row is None:
                row = Trial(
                    id=self._id(trial), account_id=self.account_id, run_id=self.run_id,
                    number=_trial_number(trial.trial_id), hyperparameters=hyperparameters,
                    folder=str(self.spec.trial_folder(trial.trial_id)),
                )
                session.add(row)
            row.status, row.failure_reason, row.ended_at = "RUNNING", None, None
            session.flush()
            events.publish(
                session, self.account_id, "trial.started", run_id=self.run_id,
                data={"trialId": row.id, "number": row.number, "hyperparameters": hyperparameters},
            )

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get("objective")
        if value is None:
            return
        with self.app.session() as session:
            row = session.get(Trial, self._id(trial))
            if row is not None:
                row.objective = float(value)
            events.publish(
                session, self.account_id, "trial.metric", run_id=self.run_id,
                data={"trialId": self._id(trial), "objective": float(value),
                      "step": int(result.get("training_iteration", 0))},
            )

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self.app.session() as session:
            events.publish(session, self.account_id, "trial.retrying", run_id=self.run_id,
                           data={"trialId": self._id(trial), "failures": int(trial.run_metadata.num_failures)})

    def _finish(self, trial: Any, status: str) -> None:
        folder = self.spec.trial_folder(trial.trial_id)
        metrics: dict[str, Any] = {}
        if (folder / METRICS_FILE).exists():
            metrics = json.loads((folder / METRICS_FILE).read_text())
        series = _read_series(folder)
        reason = None
        with self.app.session() as session:
            row = session.get(Trial, self._id(trial))
            if row is None:
                return
            if status == "FAILED":
                failure = folder / FAILURE_FILE
                reason = failure.read_text() if failure.exists() else _crash_reason(folder)
            elif not metrics:
                # Ray Tune ended the trial before its image did: the experiment was stopping,
                # or the early-stopping rule stopped it (Ray killed its worker and with it the
                # job's process group).
                run = get_run(session, self.account_id, self.run_id)
                if run.status != RunStatus.TUNING.value or _budget_spent(session, self.account_id, self.run_id, self.max_failed):
                    status, reason = "STOPPED", STOPPED
                else:
                    objective = [p for p in series if p["metric"] == self.spec.objective]
                    last = f"; last value {objective[-1]['value']:g}" if objective else ""
                    status = "STOPPED_EARLY"
                    reason = (f"stopped early by {EARLY_STOPPING_RULES.get(self.early_stopping, 'the scheduler')} "
                              f"after {len(objective)} values of the objective{last}")
            final = metrics.get("final") or {}
            if not final:
                for p in series:
                    final[p["metric"]] = p["value"]
            row.status, row.failure_reason, row.ended_at = status, reason, utcnow()
            row.final_metrics = final
            row.objective = final.get(self.spec.objective, row.objective)
            _store_series(session, self.account_id, row.id, series)
            events.publish(
                session, self.account_id, "trial.finished", run_id=self.run_id,
                data={"trialId": row.id, "status": status, "objective": row.objective,
                      "reason": reason},
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "COMPLETED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FAILED")


class ExperimentStopper(tune.Stopper):
    """Stops the whole experiment once the run is no longer TUNING (cancelled or failed), or
    once the failed-trial budget (``maxFailedTrials``) is spent."""

    CHECK_EVERY_S = 1.0

    def __init__(self, app: App, account_id: str, run_id: str, max_failed: int | None):
        self.app, self.account_id, self.run_id, self.max_failed = app, account_id, run_id, max_failed
        self._checked, self._stop = 0.0, False

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "app"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.app = current_app()
        self._checked, self._stop = 0.0, False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._checked >= self.CHECK_EVERY_S:
            self._checked = now
            with self.app.session() as session:
                self._stop = (
                    get_run(session, self.account_id, self.run_id).status != RunStatus.TUNING.value
                    or _budget_spent(session, self.account_id, self.run_id, self.max_failed)
                )
        return self._stop


ABANDONED = "abandoned: the worker running this trial stopped before its experiment could be resumed"
STOPPED = "stopped: the experiment ended before this trial did (the run was cancelled or failed, or maxFailedTrials was spent)"
EXPERIMENT_NAME = "experiment"
"""One fixed Ray Tune experiment per run, under ``<run folder>/ray``: a redelivered message
resumes it (``tune.Tuner.restore``) instead of starting over."""


def _close_unfinished_trials(app: App, account_id: str, run_id: str, status: str, reason: str) -> None:
    """Trials still RUNNING when no experiment runs them any more are closed, saying why."""
    with app.session() as session:
        for trial in session.scalars(
            select(Trial).where(Trial.account_id == account_id, Trial.run_id == run_id, Trial.status == "RUNNING")
        ):
            trial.status, trial.ended_at, trial.failure_reason = status, utcnow(), reason
            events.publish(session, account_id, "trial.finished", run_id=run_id,
                           data={"trialId": trial.id, "status": status, "objective": trial.objective, "reason": reason})


def _best_trial(trials: list[Trial], mode: str) -> Trial | None:
    done = [t for t in trials if t.status == "COMPLETED" and t.objective is not None]
    if not done:
        return None
    key = (lambda t: (t.objective, -t.number)) if mode == "max" else (lambda t: (-t.objective, -t.number))
    return max(done, key=key)


def experiment_path(run_folder: Path) -> Path:
    return run_folder / "ray" / EXPERIMENT_NAME


def run_experiment(app: App, account_id: str, run_id: str, spec: TrialSpec, approach: TrainingApproach,
                   run_folder: Path) -> None:
    """Run (or resume) the run's Ray Tune experiment; trials are recorded as they go.

    Resuming keeps finished and failed trials as they are (``resume_errored`` and
    ``restart_errored`` off: a failed trial already counts against ``maxFailedTrials``) and
    starts the trials that were running again from scratch (function trainables keep no
    checkpoint), so the experiment ends with exactly ``maxTrials`` trials.
    """
    path = experiment_path(run_folder)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec), approach.resources.ray_resources()
    )
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming the tuning experiment of run %s", run_id)
        tuner = tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
            param_space=param_space(approach),
        )
    else:
        _close_unfinished_trials(app, account_id, run_id, "ABANDONED", ABANDONED)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(approach),
            tune_config=tune_config(approach),
            run_config=tune.RunConfig(
                name=EXPERIMENT_NAME, storage_path=str(path.parent),
                callbacks=[TrialRecorder(app, account_id, run_id, spec, approach)],
                stop=ExperimentStopper(app, account_id, run_id, approach.max_failed_trials),
                failure_config=tune.FailureConfig(max_failures=approach.trial_retries),
                verbose=0,
            ),
        )
    tuner.fit()


def tune_run(app: App, account_id: str, run_id: str) -> bool:
    """The tuner's step. Returns whether evaluation should be enqueued."""

    def work() -> bool:
        with app.session() as session:
            run = get_run(session, account_id, run_id)
            if run.challenger_trial_id is not None:
                return run.status == RunStatus.EVALUATING.value
            if run.status != RunStatus.TUNING.value:
                return False
            config = ModelConfig.model_validate(run.config)
            image = resolve_image(session, config.training_approach.training_image)
            # The inference image is needed right after tuning: fail now, not after the trials.
            resolve_image(session, config.deploy_approach.inference_image)
            snapshot_id = run.snapshot_id
        assert snapshot_id is not None
        approach = config.training_approach
        blobs = app.blobs(account_id)
        manifest = load_manifest(blobs, snapshot_id)
        run_folder = app.account_home(account_id) / "runs" / run_id
        channels_root = app.account_home(account_id) / "channels" / snapshot_id
        channels = {
            name: write_channel(blobs, manifest, manifest.split(name), channels_root / name)
            for name in ("train", "validation")
        }
        cv_channels = []
        if approach.validation.strategy == "timeSeriesCV":
            try:
                folds = cv_folds(manifest, approach.validation.folds)
            except ValueError as exc:
                raise StepFailed(f"time-series cross-validation: {exc}") from None
            for i, (train_rows, validation_rows) in enumerate(folds):
                base = channels_root / f"cv{approach.validation.folds}-fold-{i}"
                cv_channels.append({
                    "train": write_channel(blobs, manifest, train_rows, base / "train"),
                    "validation": write_channel(blobs, manifest, validation_rows, base / "validation"),
                })
        spec = TrialSpec(
            image=image, run_folder=run_folder, channels=channels,
            static_hyperparameters=dict(approach.static_hyperparameters),
            search_space=list(approach.search_space), metric_definitions=list(approach.metric_definitions),
            objective=approach.objective.metric, timeout_s=float(approach.max_runtime_seconds),
            cv_channels=cv_channels, cpus=approach.resources.cpu,
            memory_bytes=(approach.resources.memory * 2**20 if approach.resources.memory is not None
                          else DEFAULT_MEMORY_BYTES),
        )
        mode = approach.objective.mode
        ensure_ray(app.settings)
        with _experiment_lock:
            try:
                run_experiment(app, account_id, run_id, spec, approach, run_folder)
            finally:
                _close_unfinished_trials(app, account_id, run_id, "STOPPED", STOPPED)
        with app.session() as session:
            if get_run(session, account_id, run_id).status != RunStatus.TUNING.value:
                return False  # cancelled while tuning
        with app.session() as session:
            trials = list(session.scalars(select(Trial).where(Trial.account_id == account_id, Trial.run_id == run_id)))
        failed = [t for t in trials if t.status == "FAILED"]
        if approach.max_failed_trials is not None and len(failed) >= approach.max_failed_trials:
            reasons = sorted({(t.failure_reason or "no result")[:300] for t in failed})
            raise StepFailed(f"maxFailedTrials ({approach.max_failed_trials}) spent: {len(failed)} of "
                             f"{len(trials)} trials failed: " + " || ".join(reasons[:3]))
        best = _best_trial(trials, mode)
        if best is None:
            reasons = sorted({(t.failure_reason or "no result")[:300] for t in trials})
            raise StepFailed(f"no trial succeeded ({len(trials)} tried): " + " || ".join(reasons[:3]))
        artifact = store_model(blobs, Path(best.folder) / "model")
        with app.session() as session:
            run = get_run(session, account_id, run_id, for_update=True)
            if run.status != RunStatus.TUNING.value:
                return False
            run.challenger_trial_id = best.id
            run.artifact_sha256 = artifact
            events.publish(
                session, account_id, "run.tuned", run_id=run_id, model_id=run.model_id,
                data={"challengerTrialId": best.id, "objective": best.objective, "trials": len(trials)},
            )
            set_status(session, run, RunStatus.EVALUATING)
        return True

    return run_step(app, account_id, run_id, "tune", work)
