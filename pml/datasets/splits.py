"""Patient-grouped, time-based splits: every patient in one split, the most recent in test.

Deployed models meet the future, so the test set is the newest data; a patient never spans
two splits, so the model is never scored on someone it has already seen.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable

from pydantic import BaseModel, Field

TRAIN, VALIDATION, TEST = "train", "validation", "test"


class SplitPolicy(BaseModel):
    validation_fraction: float = Field(default=0.15, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)


def assign_splits(
    examples: Iterable[tuple[str, dt.datetime]], policy: SplitPolicy
) -> dict[str, str]:
    """Map patient id → split, from ``(patient id, example time)`` pairs.

    Patients are ordered by their latest example (ties by id, so the result is deterministic);
    the newest take test until it holds its share of examples, the next ones validation.
    """
    latest: dict[str, dt.datetime] = {}
    counts: dict[str, int] = {}
    for patient, time in examples:
        counts[patient] = counts.get(patient, 0) + 1
        if patient not in latest or time > latest[patient]:
            latest[patient] = time
    total = sum(counts.values())
    ordered = sorted(latest, key=lambda p: (latest[p], p), reverse=True)
    splits: dict[str, str] = {}
    test_goal = policy.test_fraction * total
    validation_goal = policy.validation_fraction * total
    in_test = in_validation = 0
    remaining = len(ordered)
    for patient in ordered:
        # Always leave at least one patient for each later split.
        if in_test < test_goal and remaining > 2:
            splits[patient] = TEST
            in_test += counts[patient]
        elif in_validation < validation_goal and remaining > 1:
            splits[patient] = VALIDATION
            in_validation += counts[patient]
        else:
            splits[patient] = TRAIN
        remaining -= 1
    return splits
