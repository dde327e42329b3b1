"""The tune step: a Ray Tune experiment over the search space; the best trial is the challenger.

Trials run the training image through the runtime its registry entry names. The driver's
callback records every trial and its progress as it happens, so clients can watch.
"""

from __future__ import annotations

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

from ray import tune  # noqa: E402
from ray.tune import Callback
from ray.tune.search import BasicVariantGenerator
from sqlalchemy import select

from pml import events
from pml.app import App, current_app
from pml.artifacts import store_model
from pml.datasets.channels import write_channel
from pml.datasets.snapshot import cv_folds, load_manifest
from pml.errors import StepFailed
from pml.images import resolve_image
from pml.runs import RunStatus, get_run, run_step, set_status
from pml.schemas.config import ModelConfig
from pml.settings import Settings
from pml.store.tables import Trial, utcnow
from pml.tuning.search_space import to_param_space
from pml.tuning.trial import FAILURE_FILE, METRICS_FILE, TrialSpec, run_trial

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


class TrialRecorder(Callback):
    """Writes trials and their events to the store from the driver, as Ray Tune reports them."""

    def __init__(self, app: App, account_id: str, run_id: str, spec: TrialSpec, mode: str):
        self.app, self.account_id, self.run_id, self.spec, self.mode = app, account_id, run_id, spec, mode

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

    def _finish(self, trial: Any, status: str) -> None:
        folder = self.spec.trial_folder(trial.trial_id)
        metrics: dict[str, Any] = {}
        if (folder / METRICS_FILE).exists():
            metrics = json.loads((folder / METRICS_FILE).read_text())
        reason = None
        if status == "FAILED":
            failure = folder / FAILURE_FILE
            reason = failure.read_text() if failure.exists() else "the trial process crashed"
        final = metrics.get("final", {})
        with self.app.session() as session:
            row = session.get(Trial, self._id(trial))
            if row is None:
                return
            row.status, row.failure_reason, row.ended_at = status, reason, utcnow()
            row.final_metrics = final
            row.objective = final.get(self.spec.objective, row.objective)
            events.publish(
                session, self.account_id, "trial.finished", run_id=self.run_id,
                data={"trialId": row.id, "status": status, "objective": row.objective,
                      "reason": reason},
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "COMPLETED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FAILED")


class RunCancelled(tune.Stopper):
    """Stops the whole experiment once the run is no longer TUNING (cancelled or failed)."""

    CHECK_EVERY_S = 1.0

    def __init__(self, app: App, account_id: str, run_id: str):
        self.app, self.account_id, self.run_id = app, account_id, run_id
        self._checked, self._stop = 0.0, False

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "app"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.app = current_app()

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._checked >= self.CHECK_EVERY_S:
            self._checked = now
            with self.app.session() as session:
                self._stop = get_run(session, self.account_id, self.run_id).status != RunStatus.TUNING.value
        return self._stop


ABANDONED = "abandoned: the worker running this trial stopped; the run's tuning started again"
STOPPED = "stopped: the experiment ended before this trial did (the run was cancelled or failed)"


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


def _fit(app: App, account_id: str, run_id: str, spec: TrialSpec, config: ModelConfig, run_folder: Path) -> None:
    """One Ray Tune experiment over the run's search space."""
    approach = config.training_approach
    mode = approach.objective.mode
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"cpu": 1}),
        param_space=to_param_space(approach.search_space),
        tune_config=tune.TuneConfig(
            num_samples=approach.max_trials, metric="objective", mode=mode,
            search_alg=BasicVariantGenerator(random_state=approach.seed),
            max_concurrent_trials=approach.max_parallel_trials,
        ),
        run_config=tune.RunConfig(
            # A redelivered message starts a fresh experiment beside the dead one's.
            name=f"experiment-{int(time.time() * 1000)}", storage_path=str(run_folder / "ray"),
            callbacks=[TrialRecorder(app, account_id, run_id, spec, mode)],
            stop=RunCancelled(app, account_id, run_id), verbose=0,
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
        _close_unfinished_trials(app, account_id, run_id, "FAILED", ABANDONED)
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
            cv_channels=cv_channels,
        )
        mode = approach.objective.mode
        ensure_ray(app.settings)
        with _experiment_lock:
            try:
                _fit(app, account_id, run_id, spec, config, run_folder)
            finally:
                _close_unfinished_trials(app, account_id, run_id, "STOPPED", STOPPED)
        with app.session() as session:
            if get_run(session, account_id, run_id).status != RunStatus.TUNING.value:
                return False  # cancelled while tuning
        with app.session() as session:
            trials = list(session.scalars(select(Trial).where(Trial.account_id == account_id, Trial.run_id == run_id)))
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
