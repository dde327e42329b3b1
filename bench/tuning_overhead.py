"""pml's tuning against a bare Ray Tune script running the same trials.

Both run examples/sklearn-image's ``train`` on the same channels with the same search space,
seed and parallelism on one local Ray started once; pml runs its tune step in this process
(process runtime, SQLite store). Prints wall times, the ratio pml / bare and the overhead
per trial. Usage: python bench/tuning_overhead.py [--trials 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator

from pml.accounts import create_account
from pml.app import App, set_current_app
from pml.curation import curate_run
from pml.demo import EXAMPLE_IMAGE_DIR, SERVE_IMAGE, TRAIN_IMAGE, digits_config
from pml.demo_data import write_demo_fhir
from pml.images import add_image
from pml.models import create_model
from pml.runs import create_run
from pml.settings import Settings
from pml.tuning import tuner as pml_tuner
from pml.tuning.tuner import ensure_ray, shutdown_ray, tune_run

SEED = 7
REGEX = re.compile(r"validation:accuracy=([0-9.]+)")
STATIC = {"image_size": "8", "hidden": "128", "shift": "1"}


def bare_trial(config: dict[str, Any], channels: dict[str, str], root: str) -> None:
    """What a team would write by hand: lay out /opt/ml, run train, report each accuracy line."""
    folder = Path(root) / tune.get_context().get_trial_id()
    (folder / "input" / "config").mkdir(parents=True, exist_ok=True)
    (folder / "model").mkdir(exist_ok=True)
    (folder / "output").mkdir(exist_ok=True)
    hp = {**STATIC, "alpha": repr(config["alpha"]), "epochs": str(config["epochs"])}
    (folder / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hp))
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "SM_MODEL_DIR": str(folder / "model"), "SM_INPUT_CONFIG_DIR": str(folder / "input" / "config"),
           "SM_OUTPUT_DIR": str(folder / "output"),
           **{f"SM_CHANNEL_{k.upper()}": v for k, v in channels.items()}}
    process = subprocess.Popen([str(EXAMPLE_IMAGE_DIR / "train")], cwd=folder, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = REGEX.search(line)
        if match:
            tune.report({"objective": float(match.group(1))})
    if process.wait() != 0:
        raise RuntimeError("training failed")


def run_bare(trials: int, channels: dict[str, str], root: Path) -> float:
    started = time.perf_counter()
    tune.Tuner(
        tune.with_resources(tune.with_parameters(bare_trial, channels=channels, root=str(root)), {"cpu": 1}),
        param_space={"alpha": tune.loguniform(1e-4, 1e-2), "epochs": tune.randint(10, 26)},
        tune_config=tune.TuneConfig(num_samples=trials, metric="objective", mode="max",
                                    search_alg=BasicVariantGenerator(random_state=SEED)),
        run_config=tune.RunConfig(name=f"bare-{time.time_ns()}", storage_path=str(root / "ray"), verbose=0),
    ).fit()
    return time.perf_counter() - started


EXPERIMENT_S: list[float] = []
_run_experiment = pml_tuner.run_experiment


def _timed_run_experiment(*args: Any, **kwargs: Any) -> None:
    """pml's Ray Tune experiment alone (without reading the snapshot and laying out channels)."""
    started = time.perf_counter()
    try:
        _run_experiment(*args, **kwargs)
    finally:
        EXPERIMENT_S.append(time.perf_counter() - started)


pml_tuner.run_experiment = _timed_run_experiment  # type: ignore[assignment]


def run_pml(app: App, account: str, model_id: str) -> float:
    with app.session() as session:
        run_id = create_run(session, account, model_id).id
    assert curate_run(app, account, run_id)
    started = time.perf_counter()
    assert tune_run(app, account, run_id), "pml's tuning failed"
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="pml-bench-"))
    app = App(Settings(home=home, ray_num_cpus=2))
    set_current_app(app)
    write_demo_fhir(home / "fhir")
    with app.session() as session:
        add_image(session, TRAIN_IMAGE, EXAMPLE_IMAGE_DIR)
        add_image(session, SERVE_IMAGE, EXAMPLE_IMAGE_DIR)
        create_account(session, "bench", "bench", {"type": "folder", "path": str(home / "fhir")})
        config = digits_config("imgClf", max_trials=args.trials)
        config["trainingApproach"]["seed"] = SEED
        model_id = create_model(session, "bench", config).id
    ensure_ray(app.settings)
    run_pml(app, "bench", model_id)  # warm-up: Ray's workers, the channels on disk
    snapshot_dirs = sorted((home / "accounts" / "bench" / "channels").iterdir())
    channels = {name: str(snapshot_dirs[0] / name) for name in ("train", "validation")}
    bare, pml = [], []
    for i in range(args.repeats):
        bare.append(run_bare(args.trials, channels, home / f"bare-{i}"))
        pml.append(run_pml(app, "bench", model_id))
        print(f"repeat {i + 1}: bare {bare[-1]:.1f} s, pml {pml[-1]:.1f} s "
              f"(experiment {EXPERIMENT_S[-1]:.1f} s)", flush=True)
    shutdown_ray()
    best_bare, best_pml = min(bare), min(pml)
    print(json.dumps({
        "trials": args.trials, "bare_s": [round(x, 2) for x in bare], "pml_s": [round(x, 2) for x in pml],
        "pml_experiment_s": [round(x, 2) for x in EXPERIMENT_S[1:]],
        "ratio_best": round(best_pml / best_bare, 3),
        "ratio_experiment_best": round(min(EXPERIMENT_S[1:]) / best_bare, 3),
        "ratio_mean": round(sum(pml) / sum(bare), 3),
        "overhead_per_trial_s": round((best_pml - best_bare) / args.trials, 2),
    }))


if __name__ == "__main__":
    main()
