"""The same flow on real medical images: EBHI-Seg (imgSeg) and BreastMNIST (imgClf, binary)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pml.demo import SERVE_IMAGE, TRAIN_IMAGE
from pml.evaluation.metrics import SegmentationScore
from tests.conftest import Stack
from tests.medical_fhir import (
    BREAST_CODE,
    BREAST_LABELS,
    EBHI_CODE,
    EBHI_LABELS,
    SYSTEM,
    breastmnist_to_fhir,
    ebhi_to_fhir,
)
from tests.test_flow import finish


def config(name: str, problem_type: str, code: str, labels: list[str], objective: str, static: dict[str, str]) -> dict[str, Any]:
    metrics = ["accuracy"] if problem_type == "imgClf" else ["meanIoU", "pixelAccuracy"]
    return {
        "name": name,
        "problemDefinition": {
            "problemType": problem_type,
            "trainingDataFilter": {"filterType": "FhirCodesFilter", "codes": [f"{SYSTEM}|{code}"]},
            "labelDefinition": {"labels": [{"name": label} for label in labels]},
        },
        "trainingApproach": {
            "type": "tuningJob", "trainingImage": TRAIN_IMAGE, "maxTrials": 2, "seed": 3,
            "searchSpace": [{"name": "alpha", "type": "continuous", "scale": "log", "min": 1e-4, "max": 1e-1}],
            "staticHyperparameters": static,
            "metricDefinitions": [{"name": f"validation:{m}", "regex": rf"validation:{m}=([0-9.]+)"} for m in metrics],
            "objective": {"metric": objective, "direction": "maximize"},
        },
        "deployApproach": {"type": "cloud", "inferenceImage": SERVE_IMAGE},
    }


def test_ebhi_seg_challenger_beats_a_trivial_segmenter(stack: Stack, shared_data: Path, tmp_path: Path) -> None:
    converted = ebhi_to_fhir(shared_data / "ebhi-seg", tmp_path / "fhir")
    client = stack.new_account(converted.folder)
    model = client.create_model(
        config("ebhi", "imgSeg", EBHI_CODE, EBHI_LABELS, "validation:meanIoU",
               {"image_size": "16", "seg_size": "32", "color": "rgb", "epochs": "10"})
    )
    run = finish(stack, client, client.create_run(model.id).id)
    snapshot = client.get_snapshot(run.snapshot_id)
    assert len(snapshot.examples) == 120, "every EBHI-Seg pair must be curated"
    # The trivial segmenter: every pixel foreground, of the most common training class.
    train_classes = Counter(int(converted.truth[e.example_id].max()) for e in snapshot.examples if e.split == "train")
    common = train_classes.most_common(1)[0][0]
    trivial = SegmentationScore(len(EBHI_LABELS) + 1)
    for e in snapshot.examples:
        if e.split == "test":
            truth = converted.truth[e.example_id]
            trivial.add(truth, np.full_like(truth, common))
    baseline = trivial.metrics()
    challenger = dict(run.challenger_metrics)
    assert challenger["meanIoU"] > baseline["meanIoU"] + 0.05, (challenger, baseline)
    assert challenger["pixelAccuracy"] > baseline["pixelAccuracy"] + 0.05, (challenger, baseline)


def test_breastmnist_challenger_does_clearly_better_than_chance(stack: Stack, shared_data: Path, tmp_path: Path) -> None:
    converted = breastmnist_to_fhir(shared_data / "breastmnist" / "breastmnist.npz", tmp_path / "fhir")
    client = stack.new_account(converted.folder)
    model = client.create_model(
        config("breastmnist", "imgClf", BREAST_CODE, BREAST_LABELS, "validation:accuracy",
               {"image_size": "28", "epochs": "15"})
    )
    run = finish(stack, client, client.create_run(model.id).id)
    snapshot = client.get_snapshot(run.snapshot_id)
    test_ids = {e.example_id for e in snapshot.examples if e.split == "test"}
    assert test_ids == {i for i in converted.truth if i.startswith("breast-test-")}, (
        "time-based split must put MedMNIST's test images (the newest) in test"
    )
    metrics = dict(run.challenger_metrics)
    # Chance: AUC 0.5, balanced accuracy 0.5 (the classes are 27% / 73%).
    assert metrics["auc"] > 0.7, metrics
    assert metrics["balancedAccuracy"] > 0.6, metrics
