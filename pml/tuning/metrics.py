"""Metrics read from a trial's log lines with the config's regexes, as the lines arrive."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from pml.schemas.config import MetricDefinition


@dataclass
class MetricPoint:
    step: int
    value: float
    time: float


@dataclass
class MetricParser:
    definitions: list[MetricDefinition]
    series: dict[str, list[MetricPoint]] = field(default_factory=dict)
    on_point: Callable[[str, MetricPoint], None] | None = None
    """Called with each point as it is found (the trial appends it to its series file)."""

    def __post_init__(self) -> None:
        self._compiled = [(d.name, re.compile(d.regex)) for d in self.definitions]

    def feed(self, line: str) -> dict[str, float]:
        """Apply every regex to one line; returns the metrics it reported."""
        found: dict[str, float] = {}
        for name, pattern in self._compiled:
            for match in pattern.finditer(line):
                try:
                    value = float(match.group(1))
                except (TypeError, ValueError):
                    continue
                if math.isnan(value):
                    continue
                points = self.series.setdefault(name, [])
                point = MetricPoint(step=len(points), value=value, time=time.time())
                points.append(point)
                found[name] = value
                if self.on_point is not None:
                    self.on_point(name, point)
        return found

    def final(self) -> dict[str, float]:
        """The last value of each metric: a trial's result."""
        return {name: points[-1].value for name, points in self.series.items() if points}
