"""The main job end to end on Redis, PostgreSQL, a local Ray and separate worker processes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from pml.demo import digits_config
from pml.demo_data import (
    CLASSIFICATION_CODE,
    DEMO_SYSTEM,
    DIGIT_NAMES,
    SEGMENTATION_CODE,
    classification_example_id,
    png_bytes,
    segmentation_example_id,
    write_demo_fhir,
)
from pml.v1 import pml_pb2 as pb
from tests.conftest import Stack, wait_for

RUN_TIMEOUT_S = 300


def finish(stack: Stack, client: Any, run_id: str) -> pb.Run:
    """Follow the run's event stream until it ends (that is what WatchRun is for)."""
    for _ in client.watch_run(run_id):
        pass
    run = client.get_run(run_id)
    assert run.state in (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_FAILED), run
    if run.state != pb.RUN_STATE_COMPLETED:
        pytest.fail(f"run {run_id} {run.failed_step}: {run.failure_reason}\n{stack.worker_log_tail()}")
    return run


def write_awkward_records(folder: Path) -> None:
    """A few broken records next to the good ones: each must be skipped and counted."""
    (folder / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    bad = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"resource": {
                "resourceType": "DocumentReference", "id": f"bad-base64-{code}", "status": "current",
                "type": {"coding": [{"system": DEMO_SYSTEM, "code": code}]},
                "subject": {"reference": "Patient/demo-patient-000"}, "date": "2024-01-02T00:00:00Z",
                "content": [{"attachment": {"contentType": "image/png", "data": "@@not base64@@"}}],
            }} for code in (CLASSIFICATION_CODE, SEGMENTATION_CODE)
        ] + [
            {"resource": {
                "resourceType": "DocumentReference", "id": f"escape-{code}", "status": "current",
                "type": {"coding": [{"system": DEMO_SYSTEM, "code": code}]},
                "subject": {"reference": "Patient/demo-patient-000"}, "date": "2024-01-02T00:00:00Z",
                "content": [{"attachment": {"contentType": "image/png", "url": "../../../../etc/hostname"}}],
            }} for code in (CLASSIFICATION_CODE, SEGMENTATION_CODE)
        ],
    }
    (folder / "awkward.json").write_text(json.dumps(bad))


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("digits-fhir")
    digits = write_demo_fhir(folder)
    write_awkward_records(folder)
    by_id = {classification_example_id(d): d for d in digits} | {segmentation_example_id(d): d for d in digits}
    return folder, by_id


@pytest.fixture(scope="module", params=["imgClf", "imgSeg"])
def flow(request: pytest.FixtureRequest, stack: Stack, digits_folder: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    """Create, run, approve and run again, as a client would; the tests below check each part."""
    problem_type = request.param
    folder, digits = digits_folder
    client = stack.new_account(folder)
    model = client.create_model(digits_config(problem_type, max_trials=2))
    first = finish(stack, client, client.create_run(model.id).id)
    client.approve(first.id, description="looks good", user="tester")
    wait_for(lambda: client.get_run(first.id).deploy_status == "DEPLOYED", 120, "the deployment")
    second = finish(stack, client, client.create_run(model.id).id)
    return {"type": problem_type, "client": client, "model": model, "first": first, "second": second, "digits": digits}


def test_runs_complete_with_challenger_metrics_computed_by_pml(flow: dict[str, Any]) -> None:
    first = flow["first"]
    metric, floor = ("meanIoU", 0.5) if flow["type"] == "imgSeg" else ("accuracy", 0.85)
    assert first.challenger_metrics[metric] > floor, dict(first.challenger_metrics)
    assert not first.has_champion_metrics, "the first run of a model has no champion to compare with"
    trials = flow["client"].list_trials(first.id)
    assert len(trials) == 2 and all(t.status == "COMPLETED" for t in trials), trials
    assert first.challenger_trial_id in {t.id for t in trials}
    best = max(t.objective for t in trials)
    assert next(t for t in trials if t.id == first.challenger_trial_id).objective == best


def test_second_run_scores_champion_on_the_same_test_set(flow: dict[str, Any]) -> None:
    first, second = flow["first"], flow["second"]
    assert second.snapshot_id == first.snapshot_id, "unchanged data must give the same snapshot id"
    assert second.has_champion_metrics and second.champion_run_id == first.id
    # The champion is the first run's model on the same test set: the very numbers it got then.
    assert dict(second.champion_metrics) == pytest.approx(dict(first.challenger_metrics))


def test_bad_records_are_skipped_and_counted_not_fatal(flow: dict[str, Any]) -> None:
    report = json.loads(flow["first"].curation_report_json)
    skipped = report["skipped"]
    assert skipped.get("invalid JSON") == 1, skipped
    assert skipped.get("invalid DocumentReference: content.0.attachment.data (base64_decode)") == 1, skipped
    assert skipped.get("attachment URL points outside the source folder") == 1, skipped
    assert report["examples"] == 1797


def test_snapshot_keeps_each_patient_in_one_split_with_newest_in_test(flow: dict[str, Any]) -> None:
    client = flow["client"]
    snapshot = client.get_snapshot(flow["first"].snapshot_id)
    digits = flow["digits"]
    patients: dict[str, set[str]] = {}
    for example in snapshot.examples:
        patients.setdefault(digits[example.example_id].patient_id, set()).add(example.split)
    assert all(len(splits) == 1 for splits in patients.values())
    newest_train = max(digits[e.example_id].index for e in snapshot.examples if e.split == "train")
    oldest_test = min(digits[e.example_id].index for e in snapshot.examples if e.split == "test")
    assert oldest_test > newest_train, "the test split must be the most recent data"


def test_predictions_by_id_and_by_bytes_agree_and_are_right(flow: dict[str, Any]) -> None:
    client, model, digits = flow["client"], flow["model"], flow["digits"]
    snapshot = client.get_snapshot(flow["first"].snapshot_id)
    test_ids = [e.example_id for e in snapshot.examples if e.split == "test"][:40]
    good = 0
    for example_id in test_ids:
        by_id = client.predict(model.id, example_id=example_id)
        by_bytes = client.predict(model.id, image=png_bytes(digits[example_id]))
        if flow["type"] == "imgSeg":
            assert by_id.mask_png == by_bytes.mask_png
            predicted = np.asarray(Image.open(io.BytesIO(by_id.mask_png)))
            truth = digits[example_id].mask
            good += float(((predicted > 0) == (truth > 0)).mean()) > 0.8
        else:
            assert by_id.predictions[0].value == by_bytes.predictions[0].value
            assert [p.value for p in by_id.predictions] and by_id.predictions[0].confidence >= by_id.predictions[-1].confidence
            good += by_id.predictions[0].value == DIGIT_NAMES[digits[example_id].digit]
    assert good / len(test_ids) > 0.8


def test_artifact_download_matches_the_champion_sha256(flow: dict[str, Any], tmp_path: Path) -> None:
    info = flow["client"].download_artifact(flow["model"].id, tmp_path / "model.tar.gz")
    assert info.sha256 == flow["first"].artifact_sha256
    assert info.run_id == flow["first"].id, "the champion's artifact names the champion run"
    assert (tmp_path / "model.tar.gz").stat().st_size > 0


def test_redelivered_messages_do_not_repeat_finished_work(flow: dict[str, Any], stack: Stack) -> None:
    import redis

    from tests.conftest import REDIS_URL

    client, first = flow["client"], flow["first"]
    trials_before = [t.id for t in client.list_trials(first.id)]
    for queue in ("curate", "tune", "evaluate"):
        stack.app.enqueue(queue, client.account, first.id)
    broker = redis.Redis.from_url(REDIS_URL)
    namespace = stack.app.settings.redis_namespace

    def drained() -> bool:
        return all(broker.hlen(f"{namespace}:{q}.msgs") == 0 for q in ("curate", "tune", "evaluate"))

    wait_for(drained, 60, "the duplicate messages to be processed")
    after = client.get_run(first.id)
    assert after.state == pb.RUN_STATE_COMPLETED
    assert [t.id for t in client.list_trials(first.id)] == trials_before
    assert after.snapshot_id == first.snapshot_id and dict(after.challenger_metrics) == dict(first.challenger_metrics)


def test_a_trial_shows_its_metric_series_and_streams_its_log(flow: dict[str, Any], stack: Stack, tmp_path: Path) -> None:
    client, first = flow["client"], flow["first"]
    trial = client.runs.GetTrial(pb.GetTrialRequest(trial_id=first.challenger_trial_id), metadata=client.metadata)
    series = {s.name: [p.value for p in s.points] for s in trial.metric_series}
    objective = "validation:meanIoU" if flow["type"] == "imgSeg" else "validation:accuracy"
    assert series[objective], "every match of the objective's regex is kept"
    assert series[objective][-1] == pytest.approx(trial.final_metrics[objective]), "the last match is the final value"
    assert [p.step for p in trial.metric_series[0].points] == list(range(len(trial.metric_series[0].points)))

    lines = list(client.runs.StreamTrialLogs(pb.StreamTrialLogsRequest(trial_id=trial.id), metadata=client.metadata))
    assert any(objective in line.text for line in lines)
    middle = lines[len(lines) // 2]
    rest = list(client.runs.StreamTrialLogs(
        pb.StreamTrialLogsRequest(trial_id=trial.id, offset=middle.next_offset), metadata=client.metadata
    ))
    assert [l.text for l in rest] == [l.text for l in lines[len(lines) // 2 + 1:]], "resuming repeats nothing"
    # A finished trial's followed log ends instead of waiting.
    followed = client.runs.StreamTrialLogs(pb.StreamTrialLogsRequest(trial_id=trial.id, follow=True), metadata=client.metadata)
    assert len(list(followed)) == len(lines)

    stranger = stack.new_account(tmp_path)
    for call in (
        lambda: stranger.runs.GetTrial(pb.GetTrialRequest(trial_id=trial.id), metadata=stranger.metadata),
        lambda: list(stranger.runs.StreamTrialLogs(pb.StreamTrialLogsRequest(trial_id=trial.id), metadata=stranger.metadata)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_deleting_the_model_stops_its_deployment(flow: dict[str, Any], stack: Stack) -> None:
    """Last in this file: it deletes the flow's model. The server's process group is gone, and
    the deployment and the run say so."""
    import os

    from sqlalchemy import select

    from pml.store.tables import Deployment

    client, model, first = flow["client"], flow["model"], flow["first"]

    def group_gone() -> bool:
        """No live process in the group (a killed child stays a zombie until its worker reaps it)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pid and fields[0] != "Z":
                return False
        return True

    with stack.app.session() as session:
        (serving,) = session.scalars(select(Deployment).where(
            Deployment.account_id == client.account, Deployment.model_id == model.id, Deployment.status == "SERVING"))
        deployment_id, pid = serving.id, serving.pid
    assert pid, "a process deployment records its process group"
    os.killpg(pid, 0)  # alive before
    assert not group_gone()

    client.models.DeleteModel(pb.DeleteModelRequest(model_id=model.id), metadata=client.metadata)

    wait_for(group_gone, 30, "the deleted model's inference server to stop")
    with stack.app.session() as session:
        assert session.get(Deployment, deployment_id).status == "STOPPED"
    assert client.get_run(first.id).deploy_status == "STOPPED"
