"""``pml demo``: the whole service flow once, through the gRPC gateway, on real images.

For each problem type: create a model, run it, approve it (deploying it), run it again so the
second run carries champion metrics, predict held-out images by id and by bytes, download the
champion's artifact and check its sha256. Ends with one ``RESULT {...}`` line; exits 0 only
when every step did what it should.
"""

from __future__ import annotations

import io
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console

from pml.app import App
from pml.client import PmlClient
from pml.demo_data import (
    CLASSIFICATION_CODE,
    DEMO_SYSTEM,
    DIGIT_NAMES,
    SEGMENTATION_CODE,
    DemoDigit,
    classification_example_id,
    png_bytes,
    segmentation_example_id,
    write_demo_fhir,
)
from pml.evaluation.metrics import SegmentationScore
from pml.gateway.server import build_server
from pml.images import add_image
from pml.settings import Settings
from pml.tuning.tuner import shutdown_ray
from pml.workers import start_workers

TRAIN_IMAGE = "000000000000.dkr.ecr.us-east-1.amazonaws.com/pml-examples/sklearn-image:train"
SERVE_IMAGE = "000000000000.dkr.ecr.us-east-1.amazonaws.com/pml-examples/sklearn-image:serve"
EXAMPLE_IMAGE_DIR = Path(__file__).resolve().parents[1] / "examples" / "sklearn-image"
MIN_DIGIT_ACCURACY = 0.9
MIN_DIGIT_MEAN_IOU = 0.5

console = Console(stderr=True)


def _metric_definitions(names: list[str]) -> list[dict[str, str]]:
    return [{"name": f"validation:{n}", "regex": rf"validation:{n}=([0-9.]+)"} for n in names] + [
        {"name": "train:loss", "regex": r"train:loss=([0-9.]+)"}
    ]


def digits_config(problem_type: str, *, train_image: str = TRAIN_IMAGE, serve_image: str = SERVE_IMAGE,
                  max_trials: int = 3) -> dict[str, Any]:
    """The demo's model config, in the seed's camelCase shape."""
    segmentation = problem_type == "imgSeg"
    objective = "validation:meanIoU" if segmentation else "validation:accuracy"
    return {
        "name": "digit-strokes" if segmentation else "digits",
        "description": "Handwritten digits (scikit-learn) as FHIR records",
        "problemDefinition": {
            "problemType": problem_type,
            "trainingDataFilter": {
                "filterType": "FhirCodesFilter",
                "codes": [f"{DEMO_SYSTEM}|{SEGMENTATION_CODE if segmentation else CLASSIFICATION_CODE}"],
            },
            "labelDefinition": {"labels": [{"name": n, "description": f"the digit {i}"} for i, n in enumerate(DIGIT_NAMES)]},
        },
        "trainingApproach": {
            "type": "tuningJob",
            "trainingImage": train_image,
            "maxTrials": max_trials,
            "seed": 7,
            "searchSpace": [
                {"name": "alpha", "type": "continuous", "scale": "log", "min": 1e-4, "max": 1e-2},
                {"name": "epochs", "type": "integer", "scale": "linear", "min": 10, "max": 25},
            ],
            # One hidden layer and 1-pixel shifts: the test split holds the newest writers.
            "staticHyperparameters": {"image_size": "8", "seg_size": "8", "hidden": "128", "shift": "1"},
            "metricDefinitions": _metric_definitions(["meanIoU", "pixelAccuracy"] if segmentation else ["accuracy"]),
            "objective": {"metric": objective, "direction": "maximize"},
        },
        "deployApproach": {"type": "cloud", "inferenceImage": serve_image},
    }


def _watch(client: PmlClient, run_id: str) -> Any:
    """Show a run's progress from its event stream; return the finished run."""
    for event in client.watch_run(run_id):
        data = json.loads(event.data_json)
        if event.type == "run.state":
            console.print(f"  run {run_id[:8]} → [bold]{data['status']}[/]" + (f": {data['reason']}" if data.get("reason") else ""))
        elif event.type == "run.curated":
            console.print(f"    snapshot {data['snapshotId'][:12]}: {data['examples']} examples, {data['skipped']} skipped")
        elif event.type == "trial.finished":
            value = data.get("objective")
            shown = f"{value:.4f}" if isinstance(value, float) else "-"
            console.print(f"    trial {data['trialId'][-5:]} {data['status'].lower()}, objective {shown}")
        elif event.type == "run.evaluated":
            console.print(f"    challenger {_fmt(data['challenger'])}")
            if data.get("champion"):
                console.print(f"    champion   {_fmt(data['champion'])}")
    return client.get_run(run_id)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()))


def _wait_deployed(client: PmlClient, run_id: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get_run(run_id)
        if run.deploy_status == "DEPLOYED":
            return
        if run.deploy_status == "FAILED":
            raise RuntimeError(f"deployment failed: {run.deploy_error}")
        time.sleep(0.2)
    raise RuntimeError("deployment did not finish in time")


def _problem_flow(client: PmlClient, problem_type: str, digits: dict[str, DemoDigit], workdir: Path) -> dict[str, Any]:
    segmentation = problem_type == "imgSeg"
    console.rule(f"{problem_type}")
    model = client.create_model(digits_config(problem_type))
    console.print(f"model {model.id} created")
    runs: list[dict[str, Any]] = []
    finished = []
    for attempt in (1, 2):
        run = client.create_run(model.id)
        console.print(f"run {attempt}: {run.id}")
        done = _watch(client, run.id)
        finished.append(done)
        runs.append(
            {
                "runId": done.id,
                "status": ["UNSPECIFIED", "PENDING", "CURATING", "TUNING", "EVALUATING", "COMPLETED", "FAILED",
                           "CANCELLED"][done.state],
                "challenger": dict(done.challenger_metrics),
                "champion": dict(done.champion_metrics) if done.has_champion_metrics else None,
            }
        )
        if done.failure_reason:
            runs[-1]["failure"] = f"{done.failed_step}: {done.failure_reason}"
            break
        if attempt == 1:
            client.approve(done.id, description="demo: looks good", user="demo")
            _wait_deployed(client, done.id)
            console.print(f"  approved and deployed; model {model.id[:8]} is served by run {done.id[:8]}")

    result: dict[str, Any] = {"problemType": problem_type, "modelId": model.id, "runs": runs}
    if len(finished) < 2 or any(r["status"] != "COMPLETED" for r in runs):
        return result

    # Held out from the champion's training: its snapshot's test split.
    snapshot = client.get_snapshot(finished[0].snapshot_id)
    test_ids = [e.example_id for e in snapshot.examples if e.split == "test"]
    if segmentation:
        score = SegmentationScore(len(DIGIT_NAMES) + 1)
        for example_id in test_ids:
            response = client.predict(model.id, example_id=example_id)
            predicted = np.asarray(Image.open(io.BytesIO(response.mask_png)))
            score.add(digits[example_id].mask, predicted)
        holdout = {"metric": "meanIoU", "value": score.metrics()["meanIoU"], "examples": len(test_ids)}
    else:
        correct = 0
        for example_id in test_ids:
            response = client.predict(model.id, example_id=example_id)
            correct += response.predictions[0].value == DIGIT_NAMES[digits[example_id].digit]
        holdout = {"metric": "accuracy", "value": correct / len(test_ids), "examples": len(test_ids)}
    # The same images as raw bytes must get the same answers as by id.
    agree = 0
    sample = test_ids[:20]
    for example_id in sample:
        by_id = client.predict(model.id, example_id=example_id)
        by_bytes = client.predict(model.id, image=png_bytes(digits[example_id]))
        agree += (by_id.mask_png == by_bytes.mask_png) if segmentation else (
            by_id.predictions[0].value == by_bytes.predictions[0].value
        )
    holdout["byBytesAgreement"] = agree / len(sample)
    result["holdout"] = holdout
    console.print(f"held-out {holdout['metric']} over {len(test_ids)} test examples: {holdout['value']:.4f}")

    target = workdir / f"{model.id}-model.tar.gz"
    sha = client.download_artifact(model.id, target).sha256
    result["artifactSha256"] = sha
    result["artifactMatches"] = sha == finished[0].artifact_sha256
    console.print(f"champion artifact {target.name}: sha256 {sha[:16]}… {'matches' if result['artifactMatches'] else 'DIFFERS'}")
    return result


def check(result: dict[str, Any]) -> list[str]:
    """Everything the demo promises; an empty list means success."""
    problems = []
    for problem in result["problems"]:
        name = problem["problemType"]
        runs = problem["runs"]
        if len(runs) != 2 or any(r["status"] != "COMPLETED" for r in runs):
            problems.append(f"{name}: not every run COMPLETED: {[(r['status'], r.get('failure')) for r in runs]}")
            continue
        if runs[1]["champion"] is None:
            problems.append(f"{name}: the second run has no champion metrics")
        holdout = problem.get("holdout", {})
        floor = MIN_DIGIT_MEAN_IOU if name == "imgSeg" else MIN_DIGIT_ACCURACY
        if holdout.get("value", 0) < floor:
            problems.append(f"{name}: held-out {holdout.get('metric')} {holdout.get('value')} is below {floor}")
        if holdout.get("byBytesAgreement") != 1.0:
            problems.append(f"{name}: predictions by bytes differ from predictions by id")
        if not problem.get("artifactMatches"):
            problems.append(f"{name}: the downloaded artifact's sha256 does not match the run's")
    return problems


def run_demo(settings: Settings, image_dir: Path = EXAMPLE_IMAGE_DIR) -> int:
    started = time.monotonic()
    if not (image_dir / "train").is_file():
        console.print(f"[red]example image folder not found: {image_dir} (run the demo from a pml checkout)[/]")
        return 2
    settings = settings.model_copy(update={"admin_key": settings.admin_key or secrets.token_urlsafe(24)})
    app = App(settings)
    workdir = settings.home / "demo"
    fhir_folder = workdir / "fhir"
    console.print(f"PML_HOME={settings.home}; writing the demo FHIR records to {fhir_folder}")
    all_digits = write_demo_fhir(fhir_folder)
    by_id = {classification_example_id(d): d for d in all_digits} | {segmentation_example_id(d): d for d in all_digits}
    with app.session() as session:  # what an operator does with `pml images add`
        add_image(session, TRAIN_IMAGE, image_dir)
        add_image(session, SERVE_IMAGE, image_dir)
    worker = start_workers(app)
    server, port = build_server(app, "127.0.0.1:0")
    console.print(f"gateway on 127.0.0.1:{port}, workers in this process")
    client = PmlClient(f"127.0.0.1:{port}", admin_key=settings.admin_key or "")
    try:
        account_id = f"demo-{int(time.time())}"
        client.create_account(account_id, {"type": "folder", "path": str(fhir_folder)}, name="pml demo")
        client.account, client.api_key = account_id, client.create_api_key(account_id, "demo")
        console.print(f"account {account_id} and an API key created")
        problems = [_problem_flow(client, p, by_id, workdir) for p in ("imgClf", "imgSeg")]
    finally:
        client.close()
        server.stop(grace=2)
        worker.stop()
        shutdown_ray()
    result = {"problems": problems, "seconds": round(time.monotonic() - started, 1)}
    failures = check(result)
    for failure in failures:
        console.print(f"[red]FAILED: {failure}[/]")
    print("RESULT " + json.dumps(result), flush=True)
    return 1 if failures else 0


def main() -> None:
    sys.exit(run_demo(Settings()))


if __name__ == "__main__":
    main()
