"""The evaluate step: challenger and champion scored on the same hold-out test split.

pml runs each model's inference image on the test images and computes the metrics itself
from the predictions and the ground truth; it never trusts numbers an image prints.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from pml import events
from pml.app import App
from pml.artifacts import unpack_model
from pml.blobs import BlobStore
from pml.datasets.snapshot import ManifestExample, SnapshotManifest, load_manifest
from pml.errors import StepFailed
from pml.evaluation.metrics import SegmentationScore, classification_metrics, multilabel_metrics
from pml.images import resolve_image
from pml.models import get_model
from pml.runs import RunStatus, get_run, run_step, set_status
from pml.runtimes import runtime_for
from pml.serving.client import forget, invoke

HEALTH_TIMEOUT_S = 120.0


def _decode_mask(data: str, example_id: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            return np.asarray(image.convert("L") if image.mode not in ("L", "I", "P") else image)
    except Exception:
        raise StepFailed(f"inference server returned an undecodable mask for example {example_id}") from None


def score_predictions(
    manifest: SnapshotManifest, examples: list[ManifestExample], predictions: list[dict[str, Any]], blobs: BlobStore
) -> dict[str, float]:
    """Metrics of one model's predictions on ``examples`` (the same order)."""
    names = list(manifest.labels)  # ordered by index
    if manifest.problem_type == "imgSeg":
        score = SegmentationScore(max(manifest.labels.values()) + 2)
        for example, prediction in zip(examples, predictions):
            if not isinstance(prediction.get("mask"), str):
                raise StepFailed(f"inference server returned no mask for example {example.id}")
            assert example.mask is not None
            with Image.open(io.BytesIO(blobs.read(example.mask))) as truth_image:
                truth = np.asarray(truth_image)
            try:
                score.add(truth, _decode_mask(prediction["mask"], example.id))
            except ValueError as exc:
                raise StepFailed(f"example {example.id}: {exc}") from None
        return score.metrics()

    def score_row(prediction: dict[str, Any], example_id: str) -> list[float]:
        scores = prediction.get("scores")
        if not isinstance(scores, dict):
            raise StepFailed(f"inference server returned no scores for example {example_id}")
        return [float(scores.get(name, 0.0)) for name in names]

    matrix = np.array([score_row(p, e.id) for e, p in zip(examples, predictions)], dtype=float)
    if manifest.multi_label:
        truth = np.array([[int(n in e.labels) for n in names] for e in examples])
        return multilabel_metrics(truth, matrix)
    y_true = [names.index(e.labels[0]) for e in examples]
    return classification_metrics(y_true, matrix, len(names))


def score_model(
    app: App, account_id: str, inference_image: str, artifact_sha: str, manifest: SnapshotManifest, split: str
) -> dict[str, float]:
    """Serve one model artifact with its inference image and score it on a split."""
    with app.session() as session:
        image = resolve_image(session, inference_image)
    blobs = app.blobs(account_id)
    home = app.account_home(account_id)
    model_dir = unpack_model(blobs, artifact_sha, home / "models")
    examples = manifest.split(split)
    server = runtime_for(image.kind).start_server(image, model_dir, home / "logs" / f"eval-{artifact_sha[:12]}.log")
    try:
        server.wait_healthy(HEALTH_TIMEOUT_S)
        predictions = invoke(server.endpoint, [(e.id, blobs.read(e.image)) for e in examples])
    finally:
        server.stop()
        forget(server.endpoint)
    return score_predictions(manifest, examples, predictions, blobs)


def evaluate_run(app: App, account_id: str, run_id: str) -> bool:
    """The evaluator's step; the run ends COMPLETED. Returns False: no step follows."""

    def work() -> bool:
        with app.session() as session:
            run = get_run(session, account_id, run_id)
            if run.status != RunStatus.EVALUATING.value:
                return False
            config = run.config
            model = get_model(session, account_id, run.model_id)
            champion = None
            if model.champion_run_id and model.champion_run_id != run.id:
                champion = get_run(session, account_id, model.champion_run_id)
            champion_info = (
                (champion.id, champion.config["deployApproach"]["inferenceImage"], champion.artifact_sha256)
                if champion is not None and champion.artifact_sha256
                else None
            )
            snapshot_id, artifact = run.snapshot_id, run.artifact_sha256
        assert snapshot_id and artifact
        manifest = load_manifest(app.blobs(account_id), snapshot_id)
        challenger = score_model(app, account_id, config["deployApproach"]["inferenceImage"], artifact, manifest, "test")
        champion_metrics = None
        if champion_info is not None:
            champion_metrics = score_model(app, account_id, champion_info[1], champion_info[2], manifest, "test")
        with app.session() as session:
            run = get_run(session, account_id, run_id, for_update=True)
            if run.status != RunStatus.EVALUATING.value:
                return False
            run.metrics = {"challenger": challenger, "champion": champion_metrics}
            run.champion_run_id = champion_info[0] if champion_info else None
            events.publish(
                session, account_id, "run.evaluated", run_id=run_id, model_id=run.model_id,
                data={"challenger": challenger, "champion": champion_metrics, "championRunId": run.champion_run_id},
            )
            set_status(session, run, RunStatus.COMPLETED)
        return False

    return run_step(app, account_id, run_id, "evaluate", work)
