"""The search space and strategies: SageMaker scales, seeded sequences, grid, config checks."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from pml.app import App
from pml.errors import InvalidArgument
from pml.schemas.config import Scale, SearchParameter, TrainingApproach, parse_model_config
from pml.tuning.search_space import decode, effective_scale
from pml.tuning.strategy import param_space, tune_config
from tests.tuning_support import tuning_config

SPACE = [
    {"name": "alpha", "type": "continuous", "scale": "log", "min": 1e-4, "max": 1e-1},
    {"name": "momentum", "type": "continuous", "scale": "reverseLog", "min": 0.5, "max": 0.999},
    {"name": "layers", "type": "integer", "scale": "linear", "min": 1, "max": 4},
    {"name": "width", "type": "integer", "scale": "auto", "min": 8, "max": 1024},
    {"name": "act", "type": "categorical", "values": ["relu", "tanh"]},
]


def approach(**fields: Any) -> TrainingApproach:
    return parse_model_config(tuning_config(**fields)).training_approach


def violations(**fields: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        parse_model_config(tuning_config(**fields))
    return dict(caught.value.violations)


def test_auto_scale_is_log_for_ranges_of_two_orders_of_magnitude_and_linear_otherwise() -> None:
    def p(low: float, high: float, kind: str = "continuous") -> SearchParameter:
        return SearchParameter(name="x", type=kind, scale="auto", min=low, max=high)

    assert effective_scale(p(1e-4, 1e-2)) is Scale.LOG
    assert effective_scale(p(8, 1024, "integer")) is Scale.LOG
    assert effective_scale(p(10, 25, "integer")) is Scale.LINEAR
    assert effective_scale(p(0, 1)) is Scale.LINEAR, "a range from 0 cannot be log"
    assert effective_scale(p(-1, 100)) is Scale.LINEAR


def test_reverse_log_values_stay_in_range_and_crowd_towards_one() -> None:
    space = [SearchParameter(name="m", type="continuous", scale="reverseLog", min=0.0, max=0.999)]
    domain = param_space(approach(searchSpace=[{"name": "m", "type": "continuous", "scale": "reverseLog",
                                                "min": 0.0, "max": 0.999}]))["m"]
    values = [decode({"m": domain.sample()}, space)["m"] for _ in range(2000)]
    assert all(0.0 <= v <= 0.999 for v in values)
    assert sum(v > 0.9 for v in values) > len(values) / 2, "reverseLog samples densely near 1"


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"strategy": "grid", "searchSpace": SPACE[:1]}, "trainingApproach.searchSpace[0].type", "categorical parameters only"),
        ({"strategy": "grid", "maxTrials": 3, "searchSpace": [
            {"name": "a", "type": "categorical", "values": ["1", "2"]},
            {"name": "b", "type": "categorical", "values": ["x", "y"]}]},
         "trainingApproach.maxTrials", "every combination (4)"),
        ({"strategy": "annealing"}, "trainingApproach.strategy", "Input should be"),
        ({"earlyStopping": "hyperband"}, "trainingApproach.earlyStopping", "Input should be"),
        ({"maxFailedTrials": 0}, "trainingApproach.maxFailedTrials", "greater than or equal to 1"),
        ({"trialRetries": -1}, "trainingApproach.trialRetries", "greater than or equal to 0"),
        ({"resources": {"cpu": 0}}, "trainingApproach.resources.cpu", "greater than 0"),
        ({"resources": {"gpu": "1"}}, "trainingApproach.resources.gpu", "valid number"),
        ({"resources": {"disk": 1}}, "trainingApproach.resources.disk", "Extra inputs"),
        ({"searchSpace": [{"name": "n", "type": "integer", "scale": "reverseLog", "min": 0, "max": 0.5}]},
         "trainingApproach.searchSpace[0].scale", "continuous parameters only"),
        ({"searchSpace": [{"name": "n", "type": "integer", "min": "3", "max": 5}]},
         "trainingApproach.searchSpace[0].min", "valid number"),
    ],
)
def test_bad_tuning_config_names_field_and_reason(fields: dict[str, Any], field: str, reason: str) -> None:
    found = violations(**fields)
    assert field in found, found
    assert reason in found[field], found


def test_resources_reach_ray_in_its_units() -> None:
    resources = approach(resources={"cpu": 2, "gpu": 0.5, "memory": 512}).resources.ray_resources()
    assert resources == {"cpu": 2.0, "gpu": 0.5, "memory": 512 * 1024 * 1024}


def _sampled(fields: dict[str, Any], tmp_path: Path, name: str) -> list[dict[str, Any]]:
    """The hyperparameters of each trial, in the order the search algorithm proposed them."""

    def trainable(config: dict[str, Any]) -> None:
        # A made-up objective so that TPE has something to model.
        tune.report({"objective": -abs(math.log10(config["alpha"]) + 2.5) - config.get("layers", 0) / 10})

    a = approach(**fields)
    # Reusing actors only makes these trivial trials quick; what is tested is the proposals.
    results = tune.Tuner(
        trainable, param_space=param_space(a), tune_config=dataclasses.replace(tune_config(a), reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0),
    ).fit()
    assert not results.errors, results.errors
    # The result grid lists trials in the order the experiment created them.
    return [dict(results[i].config) for i in range(len(results))]


@pytest.mark.parametrize("strategy", ["random", "bayesian"])
def test_same_seed_gives_the_same_hyperparameter_sequence(tuning_app: App, tmp_path: Path, strategy: str) -> None:
    fields = {"strategy": strategy, "seed": 11, "maxTrials": 4, "maxParallelTrials": 1, "searchSpace": copy.deepcopy(SPACE)}
    first = _sampled(fields, tmp_path, "first")
    second = _sampled(fields, tmp_path, "second")
    assert len(first) == 4
    assert first == second, f"{strategy}: the same seed proposed different hyperparameters"
    for config in first:
        assert 1e-4 <= config["alpha"] <= 1e-1 and 1 <= config["layers"] <= 4 and 8 <= config["width"] <= 1024
        assert config["act"] in ("relu", "tanh")
    if strategy == "random":
        other = _sampled({**fields, "seed": 12}, tmp_path, "other-seed")
        assert other != first, "another seed must give another sequence"


def test_grid_runs_every_combination_once(tuning_app: App, tmp_path: Path) -> None:
    space = [
        {"name": "alpha", "type": "categorical", "values": ["0.001", "0.01"]},
        {"name": "act", "type": "categorical", "values": ["relu", "tanh", "gelu"]},
    ]
    a = approach(strategy="grid", maxTrials=10, searchSpace=space)

    def trainable(config: dict[str, Any]) -> None:
        tune.report({"objective": float(config["alpha"])})

    results = tune.Tuner(trainable, param_space=param_space(a),
                         tune_config=dataclasses.replace(tune_config(a), reuse_actors=True), run_config=tune.RunConfig(name="grid", storage_path=str(tmp_path), verbose=0)).fit()
    seen = sorted((r.config["alpha"], r.config["act"]) for r in results)
    assert seen == sorted(itertools.product(["0.001", "0.01"], ["relu", "tanh", "gelu"]))
