"""Bodies of the HTTP/JSON API, shaped like the public Patient ML Service API (camelCase).

Declared as pydantic models so the OpenAPI document is generated from the same classes
that serialize the answers; the config parts reuse pml's own config classes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from pml.schemas.config import DeployApproach, ModelConfig, ProblemDefinition, TrainingApproach

RunStatus = Literal["running", "succeeded", "failed"]
Direction = Literal["maximize", "minimize"]


class _Body(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class FieldViolation(_Body):
    field: str
    """Path of the offending field, e.g. ``trainingApproach.searchSpace[0].min``."""
    description: str


class ErrorBody(_Body):
    """Every error answer: the status name, a message, and for 400 the field violations."""

    code: str
    message: str
    field_violations: list[FieldViolation] = Field(default_factory=list)


class ModelBody(ModelConfig):
    """A model config as stored (labels with their stable ``id`` and ``index``) and its ids."""

    id: str
    account_id: str
    champion_id: str | None = None
    """The run whose model is in production (approved last)."""
    deployed_id: str | None = None
    """Deprecated spelling of ``championId`` that older clients read."""
    created: int | None = None
    """Epoch milliseconds."""
    updated: int | None = None


class CreateModelResponse(_Body):
    model: ModelBody


class ModelList(_Body):
    items: list[ModelBody]
    next_page_token: str | None = None
    """Pass as ``nextPageToken`` to get the next page; absent on the last page."""


class Parameter(_Body):
    name: str
    value: str


class Metric(_Body):
    name: str
    value: float
    stage: Literal["training", "evaluation"]
    """``evaluation``: computed by pml on the run's test split; ``training``: reported by the
    challenger trial (validation split, or the mean over time-series CV folds)."""
    direction: Direction | None = None


class RunMetrics(_Body):
    challenger: list[Metric]
    champion: list[Metric]
    """The champion's metrics on this run's test split; empty when there was no champion."""


class ApprovalBody(_Body):
    id: str
    decision: Literal["approved", "rejected"]
    description: str = ""
    timestamp: int
    """Epoch milliseconds."""
    actor: str
    """Who made the call: ``key:<api key id>`` or ``admin``."""
    user: str = ""
    """The person the caller names as deciding."""


class RunBody(_Body):
    id: str
    slug: str
    """A readable handle: the model's name and the start of the run id."""
    model_id: str
    account_id: str
    status: RunStatus
    error: str | None = None
    deploy_status: str
    """``notDeployed``, ``pending``, ``deploying``, ``deployed``, ``failed``, ``superseded`` or
    ``stopped`` (the model was deleted)."""
    deploy_error: str | None = None
    start: int
    """Epoch milliseconds."""
    end: int | None = None
    hyperparameters: list[Parameter]
    """The challenger trial's hyperparameters, as the training image got them (strings)."""
    champion_id: str | None = None
    metrics: RunMetrics
    approvals: list[ApprovalBody]
    problem_definition: ProblemDefinition
    training_approach: TrainingApproach
    deploy_approach: DeployApproach
    """The run's own copy of the config: a later model update never changes it."""


class RunList(_Body):
    items: list[RunBody]
    next_page_token: str | None = None


class CreateRunResponse(_Body):
    run_id: str


class ApprovalRequest(_Body):
    """``decision`` (or ``choice``, the older name): ``approved`` / ``rejected`` (also
    ``approve`` / ``reject``, any case)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    decision: str | None = None
    choice: str | None = None
    description: str = Field(default="", max_length=10_000)
    user: str = Field(default="", max_length=200)


class PredictRequest(_Body):
    """Give ``exampleId`` (a DocumentReference id of a curated example) or ``image``
    (base64 PNG or JPEG)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    prediction_type: str | None = None
    """When given, must be the model's problem type (``imgClf`` and ``imgClassification`` are the same)."""
    example_id: str | None = None
    image: str | None = None


class LabelPrediction(_Body):
    index: int
    value: str
    confidence: float


class PredictResponse(_Body):
    prediction_type: str
    predictions: list[LabelPrediction]
    """Labels by falling confidence."""
    mask: str | None = None
    """imgSeg: the predicted mask as a base64 PNG (pixel value = label index + 1)."""
