"""Shared by the tuning tests: a tiny fake training image and a run ready to tune.

The fake image's behaviour is chosen by its hyperparameters, so one grid search can hold
trials that succeed, fail, never report, or do badly enough to be stopped early.
"""

from __future__ import annotations

import datetime as dt
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pml.accounts import create_account
from pml.app import App
from pml.curation import curate_run
from pml.fhir.bundles import ExampleSpec, PatientSpec, write_patient_bundles
from pml.images import add_image
from pml.models import create_model
from pml.runs import create_run

CODE_SYSTEM = "urn:pml:test"
CODE = "tiny-image"

# Behaviours (hyperparameter "behaviour", matched by prefix):
#   good   reports score=0.9 for `steps` steps, writes a model, exits 0
#   bad    reports score=0.1 for 60 slow steps, with a grandchild `sleep` in its group
#   slow   like good, with `delay` seconds between steps
#   fail   writes /opt/ml/output/failure and exits 1
#   crash  prints a line and exits 3 without a failure file
#   silent prints lines the objective regex never matches, exits 0
#   flaky  exits 4 on its first start (a transient failure), behaves as good on the next
# Every start also prints what the runtime gave it: "resources cpus=N gpus=N visible=...".
FAKE_TRAIN = r'''#!/usr/bin/env python3
import json, os, subprocess, sys, time
hp = json.load(open(os.path.join(os.environ["SM_INPUT_CONFIG_DIR"], "hyperparameters.json")))
behaviour = hp.get("behaviour", "good")
steps, delay = int(hp.get("steps", "4")), float(hp.get("delay", "0.05"))
with open("pids", "a") as f:
    f.write(f"{os.getpid()}\n")
with open("intervals", "a") as f:
    f.write(f"start {time.time()}\n")
print(f"hyperparameters {json.dumps(hp, sort_keys=True)}", flush=True)
print(f"resources cpus={os.environ['SM_NUM_CPUS']} gpus={os.environ['SM_NUM_GPUS']} "
      f"visible={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}", flush=True)
if behaviour.startswith("flaky") and not os.path.exists("flaky-started"):
    open("flaky-started", "w").close()
    print("transient failure", file=sys.stderr, flush=True)
    sys.exit(4)
if behaviour.startswith("fail"):
    with open(os.path.join(os.environ["SM_OUTPUT_DIR"], "failure"), "w") as f:
        f.write("Training failed: behaviour says fail" + "!" * 2000)
    sys.exit(1)
if behaviour.startswith("crash"):
    print("boom, no reason given", file=sys.stderr, flush=True)
    sys.exit(3)
if behaviour.startswith("silent"):
    print("epoch=1 nothing to see", flush=True)
    sys.exit(0)
if behaviour.startswith("bad"):
    child = subprocess.Popen(["sleep", "300"])
    with open("pids", "a") as f:
        f.write(f"{child.pid}\n")
    steps, delay, value = 60, 0.25, 0.1
else:
    value = 0.9
for step in range(1, steps + 1):
    time.sleep(delay)
    print(f"epoch={step} score={value}", flush=True)
    print(f"epoch={step} loss={1 - value}", file=sys.stderr, flush=True)
os.makedirs(os.environ["SM_MODEL_DIR"], exist_ok=True)
with open(os.path.join(os.environ["SM_MODEL_DIR"], "model.txt"), "w") as f:
    f.write(behaviour)
with open("intervals", "a") as f:
    f.write(f"end {time.time()}\n")
'''

IMAGE = "registry.example/pml-tests/fake:train"


def write_fake_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "serve"):
        (folder / name).write_text(FAKE_TRAIN if name == "train" else "#!/bin/sh\nexit 1\n")
        (folder / name).chmod(0o755)
    return folder


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_tiny_fhir(folder: Path) -> None:
    """A dozen images of 8 patients, two labels: enough for three non-empty splits."""
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    patients = [PatientSpec(id=f"p{k}", gender="female", birth_date="1970-01-01") for k in range(8)]
    examples = [
        ExampleSpec(id=f"ex{i}", patient_id=f"p{i % 8}", time=start + dt.timedelta(days=i), image=_png(i),
                    code_system=CODE_SYSTEM, code=CODE, labels=["yes" if i % 2 else "no"])
        for i in range(16)
    ]
    write_patient_bundles(folder, patients, examples)


def tuning_config(**approach: Any) -> dict[str, Any]:
    return {
        "name": "fake",
        "problemDefinition": {
            "problemType": "imgClf",
            "trainingDataFilter": {"codes": [f"{CODE_SYSTEM}|{CODE}"]},
            "labelDefinition": {"labels": [{"name": "no"}, {"name": "yes"}]},
        },
        "trainingApproach": {
            "trainingImage": IMAGE,
            "metricDefinitions": [{"name": "score", "regex": r"score=([0-9.]+)"},
                                  {"name": "loss", "regex": r"loss=([0-9.]+)"}],
            "objective": {"metric": "score", "direction": "maximize"},
            "split": {"strategy": "stratified"},
            **approach,
        },
        "deployApproach": {"type": "edge", "inferenceImage": IMAGE},
    }


def run_ready_to_tune(app: App, tmp_path: Path, account_id: str, config: dict[str, Any]) -> str:
    """An account, the fake image, a model and a run curated in this process: the run is TUNING."""
    fhir = tmp_path / f"fhir-{account_id}"
    write_tiny_fhir(fhir)
    image = write_fake_image(tmp_path / "fake-image")
    with app.session() as session:
        add_image(session, IMAGE, image)
        create_account(session, account_id, account_id, {"type": "folder", "path": str(fhir)})
        model = create_model(session, account_id, config)
        run_id = create_run(session, account_id, model.id).id
    assert curate_run(app, account_id, run_id), "curating the tiny data set failed"
    return run_id


def pid_alive(pid: int) -> bool:
    """Running (zombies count as gone: their process is over, only the exit status is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def recorded_pids(trial_folder: Path) -> list[int]:
    path = trial_folder / "pids"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def starts(trial_folder: Path) -> int:
    path = trial_folder / "pml_starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def environment_without_pml() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PML_")}
