"""Predictions through a model's serving deployment, by example id or by image bytes."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pml.app import App
from pml.datasets.images import ImageError, check_image
from pml.errors import FailedPrecondition, InvalidArgument, NotFound, StepFailed, require_id
from pml.models import get_model, model_config
from pml.runs import get_run
from pml.serving.client import invoke
from pml.store.tables import Deployment, SnapshotExample


@dataclass
class LabelScore:
    index: int
    value: str
    confidence: float


@dataclass
class Prediction:
    problem_type: str
    labels: list[LabelScore]
    mask_png: bytes | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _example_image(app: App, account_id: str, example_id: str) -> bytes:
    with app.session() as session:
        row = session.scalar(
            select(SnapshotExample).where(
                SnapshotExample.account_id == account_id, SnapshotExample.example_id == example_id
            ).limit(1)
        )
    if row is None:
        raise NotFound(f"example {example_id} not found")
    return app.blobs(account_id).read(row.image_sha256)


def predict(
    app: App, account_id: str, model_id: str, *, example_id: str | None = None, image: bytes | None = None
) -> Prediction:
    if (example_id is None) == (image is None):
        raise InvalidArgument([("input", "give exactly one of exampleId or image")])
    if example_id is not None:
        require_id("example_id", example_id)
    with app.session() as session:
        model = get_model(session, account_id, model_id)
        config = model_config(model)
        deployment = session.scalar(
            select(Deployment).where(
                Deployment.account_id == account_id, Deployment.model_id == model.id, Deployment.status == "SERVING"
            ).order_by(Deployment.updated_at.desc()).limit(1)
        )
        if deployment is None or not deployment.endpoint:
            raise FailedPrecondition(f"model {model_id} has no serving deployment; approve a completed run first")
        endpoint = deployment.endpoint
    if example_id is not None:
        data = _example_image(app, account_id, example_id)
    else:
        assert image is not None
        try:
            check_image(image, app.settings.max_image_pixels)
        except ImageError as exc:
            raise InvalidArgument([("image", str(exc))]) from None
        data = image
    try:
        [raw] = invoke(endpoint, [(example_id or "image", data)])
    except StepFailed as exc:
        raise FailedPrecondition(f"the deployment did not answer: {exc}") from None
    index = config.label_index()
    scores = raw.get("scores") or {}
    labels = sorted(
        (LabelScore(index=index[name], value=name, confidence=float(p)) for name, p in scores.items() if name in index),
        key=lambda s: -s.confidence,
    )
    mask = None
    if isinstance(raw.get("mask"), str):
        mask = base64.b64decode(raw["mask"])
    return Prediction(problem_type=config.problem_definition.problem_type.value, labels=labels, mask_png=mask, raw=raw)


@dataclass(frozen=True)
class ModelArtifact:
    """A run's model artifact in the blob store, verified against its sha256."""

    run_id: str
    """The run it came from: the model's champion when the caller named no run."""
    sha256: str
    size: int
    path: Path


def artifact_for(app: App, account_id: str, model_id: str, run_id: str | None = None) -> ModelArtifact:
    """A run's model artifact (default: the model's champion)."""
    with app.session() as session:
        model = get_model(session, account_id, model_id)
        target = run_id or model.champion_run_id
        if target is None:
            raise FailedPrecondition(f"model {model_id} has no champion; name a run")
        run = get_run(session, account_id, target)
        if run.model_id != model.id:
            raise NotFound(f"run {target} not found")
        if not run.artifact_sha256:
            raise FailedPrecondition(f"run {target} has no model artifact yet")
        sha = run.artifact_sha256
    path = app.blobs(account_id).verified_path(sha)
    return ModelArtifact(run_id=target, sha256=sha, size=path.stat().st_size, path=path)
