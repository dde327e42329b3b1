"""The model config, in the seed's camelCase JSON shape, and its validation.

A bad config is rejected with every offending field path and the reason, before anything
is saved; labels get a stable id and integer index when the model is created.
"""

from __future__ import annotations

import math
import re
import uuid
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError
from pydantic.alias_generators import to_camel

from pml.errors import InvalidArgument


class _Camel(BaseModel):
    # No NaN or infinity in numbers; counts and switches are StrictInt/StrictBool ("3" is not 3).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", allow_inf_nan=False)


class ProblemType(str, Enum):
    IMG_CLASSIFICATION = "imgClassification"
    IMG_CLF = "imgClf"  # the short spelling some clients send; same meaning
    IMG_SEG = "imgSeg"

    @property
    def is_segmentation(self) -> bool:
        return self is ProblemType.IMG_SEG


class TrainingDataFilter(_Camel):
    filter_type: Literal["FhirCodesFilter"] = "FhirCodesFilter"
    codes: list[str] = Field(min_length=1)
    """Codes to match, either ``code`` or ``system|code``."""


class Label(_Camel):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    id: str | None = None
    index: int | None = Field(default=None, ge=0)


class LabelDefinition(_Camel):
    labels: list[Label] = Field(min_length=1)


class ProblemDefinition(_Camel):
    problem_type: ProblemType
    multi_label: StrictBool = False
    training_data_filter: TrainingDataFilter
    label_definition: LabelDefinition


class ParameterType(str, Enum):
    INTEGER = "integer"
    CONTINUOUS = "continuous"
    CATEGORICAL = "categorical"


class Scale(str, Enum):
    AUTO = "auto"
    LINEAR = "linear"
    LOG = "log"
    REVERSE_LOG = "reverseLog"


class SearchParameter(_Camel):
    name: str = Field(min_length=1)
    type: ParameterType
    scale: Scale = Scale.AUTO
    min: StrictFloat | None = None
    max: StrictFloat | None = None
    values: list[str] | None = None


class MetricDefinition(_Camel):
    name: str = Field(min_length=1)
    regex: str = Field(min_length=1)


class Objective(_Camel):
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.direction == "maximize" else "min"


class TrialResources(_Camel):
    """What one trial holds while it runs (Ray's ``tune.with_resources``); trials queue for them."""

    cpu: StrictFloat = Field(default=1.0, gt=0, le=1024)
    gpu: StrictFloat = Field(default=0.0, ge=0, le=64)
    memory: StrictInt | None = Field(default=None, ge=1)
    """MiB the trial reserves in Ray's scheduling; the docker runtime also makes it the
    container's hard limit (swap included). The process runtime only schedules by it."""

    def ray_resources(self) -> dict[str, float]:
        out = {"cpu": self.cpu, "gpu": self.gpu}
        if self.memory is not None:
            out["memory"] = float(self.memory) * 1024 * 1024
        return out


class DataSplit(_Camel):
    """How curation splits patients: by time (newest in test) or stratified by label."""

    strategy: Literal["time", "stratified"] = "time"
    validation_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    seed: int = Field(default=0, ge=0, lt=2**32)


class Validation(_Camel):
    """How a candidate is scored: on the validation split, or by time-based CV folds."""

    strategy: Literal["holdout", "timeSeriesCV"] = "holdout"
    folds: StrictInt = Field(default=3, ge=2, le=10)


class TrainingApproach(_Camel):
    type: Literal["tuningJob"] = "tuningJob"
    training_image: str = Field(min_length=1)
    max_trials: StrictInt = Field(default=4, ge=1, le=1000)
    max_parallel_trials: StrictInt | None = Field(default=None, ge=1)
    strategy: Literal["random", "bayesian", "grid"] = "random"
    """random (seeded), bayesian (Optuna's TPE, seeded), grid (every combination of an all-categorical space)."""
    seed: StrictInt = Field(default=0, ge=0, lt=2**32)
    max_failed_trials: StrictInt | None = Field(default=None, ge=1)
    """The failure budget: the ``max_failed_trials``-th failed trial spends it, which stops the
    experiment and fails the run. Retried trials (``trial_retries``) that then succeed do not
    count. Unset: no budget (the run fails only when no trial succeeded)."""
    trial_retries: StrictInt = Field(default=0, ge=0, le=10)
    """Times a failed trial is started again (Ray's ``FailureConfig.max_failures``) before it counts as failed."""
    early_stopping: Literal["off", "median", "asha"] = "off"
    resources: TrialResources = Field(default_factory=TrialResources)
    search_space: list[SearchParameter] = Field(default_factory=list)
    static_hyperparameters: dict[str, str] = Field(default_factory=dict)
    metric_definitions: list[MetricDefinition] = Field(min_length=1)
    objective: Objective
    max_runtime_seconds: StrictInt = Field(default=3600, ge=1)
    split: DataSplit = Field(default_factory=DataSplit)
    validation: Validation = Field(default_factory=Validation)


class DeployApproach(_Camel):
    type: Literal["cloud", "edge"] = "cloud"
    inference_image: str = Field(min_length=1)


class ModelConfig(_Camel):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    problem_definition: ProblemDefinition
    training_approach: TrainingApproach
    deploy_approach: DeployApproach
    max_label_index: int | None = None

    @property
    def labels(self) -> list[Label]:
        return self.problem_definition.label_definition.labels

    def label_index(self) -> dict[str, int]:
        """Label name → stable index (only meaningful once labels are assigned)."""
        return {label.name: int(label.index or 0) for label in self.labels}

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(config)"


def _semantic_violations(config: ModelConfig) -> list[tuple[str, str]]:
    """Checks that span fields, which pydantic's per-field validation cannot express."""
    out: list[tuple[str, str]] = []
    names = [label.name for label in config.labels]
    for i, name in enumerate(names):
        if name in names[:i]:
            out.append((f"problemDefinition.labelDefinition.labels[{i}].name", f"duplicate label name {name!r}"))

    problem = config.problem_definition
    if not problem.problem_type.is_segmentation and not problem.multi_label and len(names) < 2:
        out.append(("problemDefinition.labelDefinition.labels", "a single-label classification needs at least two labels"))
    if problem.problem_type.is_segmentation and problem.multi_label:
        out.append(("problemDefinition.multiLabel", "imgSeg has one label per pixel; multiLabel must be false"))

    approach = config.training_approach
    seen: set[str] = set()
    for i, p in enumerate(approach.search_space):
        at = f"trainingApproach.searchSpace[{i}]"
        if p.name in seen:
            out.append((f"{at}.name", f"duplicate hyperparameter {p.name!r}"))
        seen.add(p.name)
        if p.type is ParameterType.CATEGORICAL:
            if not p.values:
                out.append((f"{at}.values", "a categorical parameter needs at least one value"))
            elif len(set(p.values)) != len(p.values):
                out.append((f"{at}.values", "duplicate values"))
            if p.min is not None or p.max is not None:
                out.append((f"{at}.min" if p.min is not None else f"{at}.max", "a categorical parameter takes values, not min/max"))
            continue
        if approach.strategy == "grid":
            out.append((f"{at}.type", "grid search takes categorical parameters only"))
        if p.values is not None:
            out.append((f"{at}.values", f"a {p.type.value} parameter takes min and max, not values"))
        if p.min is None or p.max is None:
            out.append((f"{at}.min" if p.min is None else f"{at}.max", f"a {p.type.value} parameter needs min and max"))
            continue
        if p.min > p.max:
            out.append((f"{at}.min", f"min ({p.min:g}) is greater than max ({p.max:g})"))
        if p.type is ParameterType.INTEGER and (p.min != int(p.min) or p.max != int(p.max)):
            out.append((f"{at}.min", "an integer parameter needs whole-number min and max"))
        if p.scale is Scale.LOG and p.min <= 0:
            out.append((f"{at}.min", "log scale needs min > 0"))
        if p.scale is Scale.REVERSE_LOG and not (0 <= p.min < p.max < 1):
            out.append((f"{at}.min", "reverseLog scale needs 0 <= min < max < 1"))
        if p.scale is Scale.REVERSE_LOG and p.type is ParameterType.INTEGER:
            out.append((f"{at}.scale", "reverseLog scale applies to continuous parameters only"))
    if approach.strategy == "grid" and all(p.type is ParameterType.CATEGORICAL for p in approach.search_space):
        combinations = math.prod(len(p.values or []) for p in approach.search_space)
        if combinations > approach.max_trials:
            out.append(("trainingApproach.maxTrials",
                        f"grid search runs every combination ({combinations}); maxTrials must be at least that"))
    for name in approach.static_hyperparameters:
        if name in seen:
            out.append((f"trainingApproach.staticHyperparameters.{name}", "also in searchSpace"))

    metric_names: list[str] = []
    for i, m in enumerate(approach.metric_definitions):
        at = f"trainingApproach.metricDefinitions[{i}]"
        if m.name in metric_names:
            out.append((f"{at}.name", f"duplicate metric {m.name!r}"))
        metric_names.append(m.name)
        try:
            compiled = re.compile(m.regex)
        except re.error as exc:
            out.append((f"{at}.regex", f"not a valid regular expression: {exc}"))
            continue
        if compiled.groups != 1:
            out.append((
                f"{at}.regex",
                "needs a capture group around the metric's value" if compiled.groups < 1
                else f"has {compiled.groups} capture groups; use exactly one, around the value ((?:...) for others)",
            ))
    if approach.objective.metric not in metric_names:
        out.append(("trainingApproach.objective.metric", f"{approach.objective.metric!r} is not among metricDefinitions"))
    return out


def parse_model_config(data: Any) -> ModelConfig:
    """Validate a config from JSON-like data; raise InvalidArgument with every violation."""
    if not isinstance(data, dict):
        raise InvalidArgument([("(config)", "must be a JSON object")])
    if isinstance(data.get("trainingApproach"), dict):
        # Objective direction is case-insensitive ("Maximize" as SageMaker spells it).
        objective = data["trainingApproach"].get("objective")
        if isinstance(objective, dict) and isinstance(objective.get("direction"), str):
            objective = {**objective, "direction": objective["direction"].lower()}
            data = {**data, "trainingApproach": {**data["trainingApproach"], "objective": objective}}
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument([(_field_path(e["loc"]), e["msg"]) for e in exc.errors()]) from None
    violations = _semantic_violations(config)
    if violations:
        raise InvalidArgument(violations)
    return config


def assign_labels(config: ModelConfig, previous: ModelConfig | None = None) -> ModelConfig:
    """Give every label a stable id and index, keeping those of ``previous`` by name.

    New labels take the next index above the highest ever used, so a dropped label's
    index is never reused (``maxLabelIndex`` remembers it).
    """
    known = {label.name: label for label in (previous.labels if previous else [])}
    highest = previous.max_label_index if previous and previous.max_label_index is not None else -1
    labels: list[Label] = []
    for label in config.labels:
        old = known.get(label.name)
        if old is not None:
            labels.append(label.model_copy(update={"id": old.id, "index": old.index}))
        else:
            highest += 1
            labels.append(label.model_copy(update={"id": uuid.uuid4().hex, "index": highest}))
    highest = max([highest] + [int(label.index or 0) for label in labels])
    problem = config.problem_definition.model_copy(
        update={"label_definition": LabelDefinition(labels=labels)}
    )
    return config.model_copy(update={"problem_definition": problem, "max_label_index": highest})
