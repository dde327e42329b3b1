"""The curation report: what was read, what was kept, and every skipped record with its reason.

Records are named by resource type and id (or file and line), never by their content.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# Keep the first few skipped records of each reason so a person can find them.
SAMPLES_PER_REASON = 20


class CurationReport:
    def __init__(self) -> None:
        self.resources_read = 0
        self.skipped: Counter[str] = Counter()
        self.samples: dict[str, list[str]] = {}
        self.examples = 0

    def skip(self, record: str, reason: str) -> None:
        self.skipped[reason] += 1
        samples = self.samples.setdefault(reason, [])
        if len(samples) < SAMPLES_PER_REASON:
            samples.append(record)

    def summary(self) -> str:
        if not self.skipped:
            return "no records skipped"
        parts = [f"{count} {reason}" for reason, count in self.skipped.most_common()]
        return "skipped: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "resourcesRead": self.resources_read,
            "examples": self.examples,
            "skipped": dict(self.skipped.most_common()),
            "skippedRecords": {reason: list(records) for reason, records in self.samples.items()},
        }
