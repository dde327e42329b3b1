"""The config's search space as a Ray Tune parameter space (SageMaker semantics).

Values are sampled by Ray Tune's domains; ``decode`` undoes the reverse-log transform and
``as_strings`` turns them into the strings the image reads from ``hyperparameters.json``.
"""

from __future__ import annotations

import math
from typing import Any

from ray import tune

from pml.schemas.config import ParameterType, Scale, SearchParameter

# ``auto`` picks log when a positive range spans at least this ratio (two orders of magnitude),
# where a linear draw would almost never try the small values; linear otherwise.
AUTO_LOG_RATIO = 100.0


def effective_scale(p: SearchParameter) -> Scale:
    """The scale a parameter is sampled on; ``auto`` resolved (never to reverseLog)."""
    if p.scale is not Scale.AUTO or p.type is ParameterType.CATEGORICAL:
        return p.scale
    assert p.min is not None and p.max is not None
    if p.min > 0 and p.max / p.min >= AUTO_LOG_RATIO:
        return Scale.LOG
    return Scale.LINEAR


def to_domain(p: SearchParameter, grid: bool = False) -> Any:
    if p.type is ParameterType.CATEGORICAL:
        values = list(p.values or [])
        return tune.grid_search(values) if grid else tune.choice(values)
    assert p.min is not None and p.max is not None
    scale = effective_scale(p)
    if p.type is ParameterType.INTEGER:
        low, high = int(p.min), int(p.max)
        if scale is Scale.LOG and low < high:
            return tune.lograndint(low, high + 1)
        return tune.randint(low, high + 1)
    if p.min == p.max:
        return tune.choice([p.min])
    if scale is Scale.LOG:
        return tune.loguniform(p.min, p.max)
    if scale is Scale.REVERSE_LOG:
        # Sampled as u = log(1 - x), uniform; ``decode`` maps it back. Dense near 1.
        return tune.uniform(math.log(1 - p.max), math.log(1 - p.min))
    return tune.uniform(p.min, p.max)


def to_param_space(search_space: list[SearchParameter], grid: bool = False) -> dict[str, Any]:
    """Ray Tune's ``param_space``; with ``grid`` every categorical becomes a ``grid_search``."""
    return {p.name: to_domain(p, grid) for p in search_space}


def decode(values: dict[str, Any], search_space: list[SearchParameter]) -> dict[str, Any]:
    """Undo the sampling transforms (reverse-log) to get the values the image receives."""
    out = dict(values)
    for p in search_space:
        if p.name not in out:
            continue
        if p.type is ParameterType.CONTINUOUS and p.scale is Scale.REVERSE_LOG and p.min != p.max:
            out[p.name] = 1 - math.exp(float(out[p.name]))
        elif p.type is ParameterType.INTEGER:
            out[p.name] = int(out[p.name])
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
