"""Model config validation: every bad field is named with its reason; labels get stable ids."""

from __future__ import annotations

import copy

import pytest

from pml.demo import digits_config
from pml.errors import InvalidArgument
from pml.schemas.config import assign_labels, parse_model_config


def violations(config: dict) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        parse_model_config(config)
    return dict(caught.value.violations)


def test_the_demo_config_is_valid() -> None:
    config = parse_model_config(digits_config("imgClf"))
    assert config.training_approach.objective.mode == "max"


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (lambda c: c["trainingApproach"]["searchSpace"][0].update(min=1.0, max=0.1), "trainingApproach.searchSpace[0].min", "greater than max"),
        (lambda c: c["trainingApproach"]["searchSpace"][0].update(min=0.0), "trainingApproach.searchSpace[0].min", "log scale needs min > 0"),
        (lambda c: c["trainingApproach"]["searchSpace"][0].update(scale="reverseLog", min=0.5, max=1.5), "trainingApproach.searchSpace[0].min", "reverseLog"),
        (lambda c: c["trainingApproach"]["objective"].update(metric="nope"), "trainingApproach.objective.metric", "not among metricDefinitions"),
        (lambda c: c["trainingApproach"]["metricDefinitions"][0].update(regex="acc=[0-9]+"), "trainingApproach.metricDefinitions[0].regex", "capture group"),
        (lambda c: c["trainingApproach"]["metricDefinitions"][0].update(regex="acc=([0-9]+"), "trainingApproach.metricDefinitions[0].regex", "not a valid regular expression"),
        (lambda c: c["problemDefinition"]["labelDefinition"]["labels"].append({"name": "zero"}), "problemDefinition.labelDefinition.labels[10].name", "duplicate label"),
        (lambda c: c["problemDefinition"].update(problemType="tabular"), "problemDefinition.problemType", "Input should be"),
        (lambda c: c["trainingApproach"].update(maxTrials=0), "trainingApproach.maxTrials", "greater than or equal to 1"),
        (lambda c: c["trainingApproach"]["searchSpace"].append({"name": "color", "type": "categorical"}), "trainingApproach.searchSpace[2].values", "at least one value"),
        (lambda c: c["trainingApproach"]["searchSpace"][1].update(min=1.5), "trainingApproach.searchSpace[1].min", "whole-number"),
        (lambda c: c.pop("deployApproach"), "deployApproach", "Field required"),
        (lambda c: c.update(surprise=1), "surprise", "Extra inputs"),
        (lambda c: c["trainingApproach"]["searchSpace"][0].update(min=float("nan")), "trainingApproach.searchSpace[0].min", "finite number"),
        (lambda c: c["trainingApproach"]["searchSpace"][1].update(max=float("inf")), "trainingApproach.searchSpace[1].max", "finite number"),
        (lambda c: c["trainingApproach"].update(seed=-5), "trainingApproach.seed", "greater than or equal to 0"),
        (lambda c: c["trainingApproach"].update(maxTrials="3"), "trainingApproach.maxTrials", "valid integer"),
        (lambda c: c["problemDefinition"].update(multiLabel="yes"), "problemDefinition.multiLabel", "valid boolean"),
        (lambda c: c["trainingApproach"]["metricDefinitions"][0].update(regex="(validation):accuracy=([0-9.]+)"), "trainingApproach.metricDefinitions[0].regex", "exactly one"),
        (lambda c: c["problemDefinition"]["labelDefinition"].update(labels=[{"name": "only"}]), "problemDefinition.labelDefinition.labels", "at least two labels"),
        (lambda c: c["problemDefinition"].update(problemType="imgSeg", multiLabel=True), "problemDefinition.multiLabel", "multiLabel must be false"),
        (lambda c: c["trainingApproach"]["searchSpace"].append({"name": "c", "type": "categorical", "values": ["a", "a"]}), "trainingApproach.searchSpace[2].values", "duplicate values"),
        (lambda c: c["trainingApproach"]["searchSpace"].append({"name": "c", "type": "categorical", "values": ["a"], "min": 1}), "trainingApproach.searchSpace[2].min", "not min/max"),
    ],
)
def test_bad_config_names_field_and_reason(change, field: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    config = copy.deepcopy(digits_config("imgClf"))
    change(config)
    found = violations(config)
    assert field in found, found
    assert reason in found[field], found


def test_several_problems_are_reported_together() -> None:
    config = digits_config("imgClf")
    config["trainingApproach"]["searchSpace"][0].update(min=1.0, max=0.1)
    config["trainingApproach"]["objective"]["metric"] = "nope"
    assert len(violations(config)) == 2


def test_objective_direction_is_case_insensitive() -> None:
    config = digits_config("imgClf")
    config["trainingApproach"]["objective"]["direction"] = "Minimize"
    assert parse_model_config(config).training_approach.objective.mode == "min"


def test_labels_keep_id_and_index_and_dropped_indexes_are_never_reused() -> None:
    first = assign_labels(parse_model_config(digits_config("imgClf")))
    assert [label.index for label in first.labels] == list(range(10))
    assert first.max_label_index == 9
    changed = digits_config("imgClf")
    labels = changed["problemDefinition"]["labelDefinition"]["labels"]
    labels.pop(3)  # drop "three"
    labels.append({"name": "ten"})
    second = assign_labels(parse_model_config(changed), previous=first)
    by_name = {label.name: label for label in second.labels}
    assert by_name["four"].id == first.labels[4].id and by_name["four"].index == 4
    assert by_name["ten"].index == 10, "a new label takes the next index above the highest ever used"
    assert second.max_label_index == 10
