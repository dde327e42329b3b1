"""Time-based cross-validation as the tuner's objective (trainingApproach.validation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from pml.demo import digits_config
from pml.demo_data import write_demo_fhir
from pml.store.tables import Trial
from tests.conftest import Stack
from tests.test_flow import finish


def test_objective_is_the_mean_over_forward_chaining_folds(stack: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    write_demo_fhir(folder)
    client = stack.new_account(folder)
    config = digits_config("imgClf", max_trials=1)
    config["trainingApproach"]["validation"] = {"strategy": "timeSeriesCV", "folds": 2}
    config["trainingApproach"]["split"] = {"strategy": "stratified", "testFraction": 0.25}
    model = client.create_model(config)
    run = finish(stack, client, client.create_run(model.id).id)
    with stack.app.session() as session:
        trial = session.scalar(select(Trial).where(Trial.run_id == run.id))
        assert trial is not None
        folder_path, objective = Path(trial.folder), trial.objective
    metrics = json.loads((folder_path / "pml_metrics.json").read_text())
    assert len(metrics["folds"]) == 2
    assert objective == pytest.approx(sum(metrics["folds"]) / 2)
    for i in range(2):
        assert (folder_path / "cv" / f"fold-{i}" / "logs" / "train.log").exists()
    stats = json.loads(client.get_snapshot(run.snapshot_id).stats_json)
    share = stats["test"]["examples"] / sum(stats[s]["examples"] for s in ("train", "validation", "test"))
    assert 0.18 < share < 0.32, stats
