"""Metrics read from a trial's log lines with the config's regexes, as the lines arrive."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

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
                points.append(MetricPoint(step=len(points), value=value, time=time.time()))
                found[name] = value
        return found

    def final(self) -> dict[str, float]:
        """The last value of each metric: a trial's result."""
        return {name: points[-1].value for name, points in self.series.items() if points}
