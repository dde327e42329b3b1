"""One trial: run the training image once, read its metrics as it logs, report to Ray Tune.

This function runs inside a Ray worker; it knows nothing of the store. The driver's callback
(``TrialRecorder``) writes trials and events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from pml.images import ResolvedImage
from pml.runtimes import TrainingJob, runtime_for
from pml.schemas.config import MetricDefinition, SearchParameter
from pml.tuning.metrics import MetricParser
from pml.tuning.search_space import as_strings, decode

FAILURE_FILE = "pml_failure.txt"
METRICS_FILE = "pml_metrics.json"


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

    def trial_folder(self, trial_id: str) -> Path:
        return self.run_folder / "trials" / trial_id

    def hyperparameters(self, sampled: dict[str, Any]) -> dict[str, str]:
        return {**self.static_hyperparameters, **as_strings(decode(sampled, self.search_space))}


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    trial_id = tune.get_context().get_trial_id()
    folder = spec.trial_folder(trial_id)
    parser = MetricParser(spec.metric_definitions)

    def on_line(line: str) -> None:
        found = parser.feed(line)
        if spec.objective in found:
            tune.report({"objective": found[spec.objective]})

    job = TrainingJob(
        image=spec.image, folder=folder, channels=spec.channels,
        hyperparameters=spec.hyperparameters(config), timeout_s=spec.timeout_s,
    )
    outcome = runtime_for(spec.image.kind).train(job, on_line)
    series = {name: [[p.step, p.value, p.time] for p in points] for name, points in parser.series.items()}
    (folder / METRICS_FILE).write_text(json.dumps({"final": parser.final(), "series": series}))
    reason = None
    if outcome.timed_out:
        reason = f"stopped after maxRuntimeSeconds ({spec.timeout_s:.0f} s)"
    elif outcome.exit_code != 0:
        reason = outcome.failure or (
            f"training exited with code {outcome.exit_code}; last log lines: " + " | ".join(outcome.log_tail[-5:])
        )
    elif spec.objective not in parser.series:
        reason = f"objective metric {spec.objective!r} never reported; last log lines: " + " | ".join(
            outcome.log_tail[-5:]
        )
    if reason:
        (folder / FAILURE_FILE).write_text(reason)
        raise TrialFailed(reason)
