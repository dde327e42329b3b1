"""The config's search space as a Ray Tune parameter space (SageMaker semantics)."""

from __future__ import annotations

import math
from typing import Any

from ray import tune

from pml.schemas.config import ParameterType, Scale, SearchParameter


def to_domain(p: SearchParameter) -> Any:
    if p.type is ParameterType.CATEGORICAL:
        return tune.choice(list(p.values or []))
    assert p.min is not None and p.max is not None
    if p.type is ParameterType.INTEGER:
        low, high = int(p.min), int(p.max)
        if p.scale is Scale.LOG:
            return tune.lograndint(low, high + 1)
        return tune.randint(low, high + 1)
    if p.scale is Scale.LOG:
        return tune.loguniform(p.min, p.max)
    if p.scale is Scale.REVERSE_LOG:
        # Sampled as u = log(1 - x), uniform; ``decode`` maps it back. Dense near 1.
        return tune.uniform(math.log(1 - p.max), math.log(1 - p.min))
    return tune.uniform(p.min, p.max)


def to_param_space(search_space: list[SearchParameter]) -> dict[str, Any]:
    return {p.name: to_domain(p) for p in search_space}


def decode(values: dict[str, Any], search_space: list[SearchParameter]) -> dict[str, Any]:
    """Undo the sampling transforms (reverse-log) to get the values the image receives."""
    out = dict(values)
    for p in search_space:
        if p.scale is Scale.REVERSE_LOG and p.type is ParameterType.CONTINUOUS and p.name in out:
            out[p.name] = 1 - math.exp(float(out[p.name]))
    return out


def as_strings(values: dict[str, Any]) -> dict[str, str]:
    """Hyperparameters reach the image as strings, as the container contract says."""
    out: dict[str, str] = {}
    for name, value in values.items():
        if isinstance(value, float):
            out[name] = repr(value)
        else:
            out[name] = str(value)
    return out
