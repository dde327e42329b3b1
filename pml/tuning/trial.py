"""One trial: run the training image once, read its metrics as it logs, report to Ray Tune.

This function runs inside a Ray worker; it knows nothing of the store. The driver's callback
(``TrialRecorder``) writes trials and events.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from pml.images import ResolvedImage
from pml.runtimes import TrainingJob, runtime_for
from pml.runtimes.base import DEFAULT_MEMORY_BYTES
from pml.schemas.config import MetricDefinition, SearchParameter
from pml.tuning.metrics import MetricParser, MetricPoint
from pml.tuning.search_space import as_strings, decode

FAILURE_FILE = "pml_failure.txt"
METRICS_FILE = "pml_metrics.json"
SERIES_FILE = "pml_series.jsonl"
"""Every metric match of the trial's training job, one JSON object a line, as it is found."""
STARTS_FILE = "pml_starts"
"""One line per start of the trial (restarts after a retry or a resumed experiment add lines)."""


class TrialFailed(Exception):
    """The training job failed; the reason is also in the trial folder for the driver."""


@dataclass(frozen=True)
class TrialSpec:
    image: ResolvedImage
    run_folder: Path
    channels: dict[str, Path]
    static_hyperparameters: dict[str, str]
    search_space: list[SearchParameter]
    metric_definitions: list[MetricDefinition]
    objective: str
    timeout_s: float
    cv_channels: list[dict[str, Path]] = field(default_factory=list)
    """Time-series CV folds; when given, the objective is the mean over the folds."""
    cpus: float = 1.0
    """The trial's ``resources.cpu``: what Ray reserves and the docker runtime's CPU limit."""
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    """The trial's ``resources.memory`` (or the default): the docker runtime's memory limit."""

    def trial_folder(self, trial_id: str) -> Path:
        return self.run_folder / "trials" / trial_id

    def hyperparameters(self, sampled: dict[str, Any]) -> dict[str, str]:
        return {**self.static_hyperparameters, **as_strings(decode(sampled, self.search_space))}


def _train(spec: TrialSpec, folder: Path, channels: dict[str, Path], hyperparameters: dict[str, str],
           report: bool, what: str, deadline: float) -> MetricParser:
    """One training job, stopped at ``deadline`` (monotonic); raises TrialFailed with the reason.

    The deadline is the trial's, not the job's: with time-series CV a trial runs one job per
    fold and one for the final model, and ``maxRuntimeSeconds`` bounds them all together.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / SERIES_FILE, "w") as series:

        def on_point(name: str, point: MetricPoint) -> None:
            series.write(json.dumps({"metric": name, "step": point.step, "value": point.value, "time": point.time}) + "\n")
            series.flush()

        parser = MetricParser(spec.metric_definitions, on_point=on_point)

        def on_line(line: str) -> None:
            found = parser.feed(line)
            if report and spec.objective in found:
                # One Ray Tune step per match: what the early-stopping rules compare.
                tune.report({"objective": found[spec.objective]})

        job = TrainingJob(image=spec.image, folder=folder, channels=channels, hyperparameters=hyperparameters,
                          timeout_s=max(0.0, deadline - time.monotonic()), gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                          cpus=spec.cpus, memory_bytes=spec.memory_bytes)
        outcome = runtime_for(spec.image.kind).train(job, on_line)
    tail = " | ".join(outcome.log_tail[-5:])
    if outcome.timed_out:
        raise TrialFailed(f"{what}stopped after maxRuntimeSeconds ({spec.timeout_s:.0f} s)")
    if outcome.exit_code != 0:
        raise TrialFailed(what + (outcome.failure or f"training exited with code {outcome.exit_code}; last log lines: {tail}"))
    if spec.objective not in parser.series:
        raise TrialFailed(f"{what}objective metric never reported ({spec.objective!r}); last log lines: {tail}")
    return parser


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    trial_id = tune.get_context().get_trial_id()
    folder = spec.trial_folder(trial_id)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (FAILURE_FILE, METRICS_FILE):  # left by an earlier start of this trial
        (folder / stale).unlink(missing_ok=True)
    with open(folder / STARTS_FILE, "a") as starts:
        starts.write(f"{time.time()}\n")
    hyperparameters = spec.hyperparameters(config)
    deadline = time.monotonic() + spec.timeout_s
    try:
        fold_scores = []
        for i, channels in enumerate(spec.cv_channels):
            parser = _train(spec, folder / "cv" / f"fold-{i}", channels, hyperparameters, False, f"fold {i}: ", deadline)
            fold_scores.append(parser.final()[spec.objective])
            tune.report({"objective": sum(fold_scores) / len(fold_scores)})
        # The model itself always trains on the full train split (validated on validation).
        parser = _train(spec, folder, spec.channels, hyperparameters, not spec.cv_channels, "", deadline)
    except TrialFailed as exc:
        (folder / FAILURE_FILE).write_text(str(exc))
        raise
    final = parser.final()
    if fold_scores:
        final[spec.objective] = sum(fold_scores) / len(fold_scores)
        tune.report({"objective": final[spec.objective]})
    series = {name: [[p.step, p.value, p.time] for p in points] for name, points in parser.series.items()}
    (folder / METRICS_FILE).write_text(json.dumps({"final": final, "series": series, "folds": fold_scores}))
