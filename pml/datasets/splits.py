"""Patient-grouped splits: every patient in exactly one split.

The default is time-based: deployed models meet the future, so the test split is the newest
data. ``stratified`` keeps label shares alike across splits instead (sklearn's
StratifiedGroupKFold), still grouped by patient. Both are deterministic. Forward-chaining
cross-validation folds (patient-grouped, time-ordered) serve tuning.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field
from sklearn.model_selection import StratifiedGroupKFold

from pml.errors import StepFailed

TRAIN, VALIDATION, TEST = "train", "validation", "test"


class SplitPolicy(BaseModel):
    strategy: str = "time"
    validation_fraction: float = Field(default=0.15, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0


@dataclass(frozen=True)
class SplitItem:
    patient: str
    time: dt.datetime
    label: str  # the label to stratify on ("" when there is none)


def _by_time(items: list[SplitItem], policy: SplitPolicy) -> dict[str, str]:
    """Patients ordered by their latest example (ties by id); the newest take test until it
    holds its share of examples, the next ones validation."""
    latest: dict[str, dt.datetime] = {}
    counts: dict[str, int] = {}
    for item in items:
        counts[item.patient] = counts.get(item.patient, 0) + 1
        if item.patient not in latest or item.time > latest[item.patient]:
            latest[item.patient] = item.time
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


def _one_fold(items: list[SplitItem], fraction: float, seed: int) -> set[str]:
    """Patients of one stratified, grouped fold holding about ``fraction`` of the examples."""
    patients = sorted({i.patient for i in items})
    largest_label = max(Counter(i.label for i in items).values())
    n_splits = max(2, min(round(1 / fraction), len(patients), largest_label))
    ordered = sorted(items, key=lambda i: (i.patient, i.time, i.label))
    labels = np.array([i.label for i in ordered])
    groups = np.array([i.patient for i in ordered])
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(ordered)), labels, groups))
    return set(groups[held])


def _stratified(items: list[SplitItem], policy: SplitPolicy) -> dict[str, str]:
    try:
        test = _one_fold(items, policy.test_fraction, policy.seed)
        rest = [i for i in items if i.patient not in test]
        validation = _one_fold(rest, policy.validation_fraction / (1 - policy.test_fraction), policy.seed + 1)
    except ValueError as exc:  # scikit-learn's word for too few examples per label
        raise StepFailed(
            f"a stratified split needs more examples of each label than folds ({exc}); "
            "use the time split or larger fractions"
        ) from None
    return {
        i.patient: TEST if i.patient in test else VALIDATION if i.patient in validation else TRAIN for i in items
    }


def assign_splits(items: list[SplitItem], policy: SplitPolicy) -> dict[str, str]:
    """Map patient id → split."""
    if policy.strategy == "stratified" and len({i.patient for i in items}) >= 3:
        return _stratified(items, policy)
    return _by_time(items, policy)


def forward_chaining_folds(items: list[SplitItem], folds: int) -> list[tuple[set[str], set[str]]]:
    """``folds`` (train patients, validation patients) pairs, time-ordered and grouped.

    Patients are ordered by their latest example and cut into ``folds + 1`` blocks of about
    equal example counts; fold i trains on blocks 0..i and validates on block i + 1, so a
    fold never validates on data older than what it trained on.
    """
    latest: dict[str, dt.datetime] = {}
    counts: dict[str, int] = {}
    for item in items:
        counts[item.patient] = counts.get(item.patient, 0) + 1
        latest[item.patient] = max(latest.get(item.patient, item.time), item.time)
    ordered = sorted(latest, key=lambda p: (latest[p], p))
    if len(ordered) < folds + 1:
        raise ValueError(f"{len(ordered)} patients are too few for {folds} time-series folds")
    total = sum(counts.values())
    blocks: list[list[str]] = [[] for _ in range(folds + 1)]
    seen = 0
    for patient in ordered:
        blocks[min(int(seen * (folds + 1) / total), folds)].append(patient)
        seen += counts[patient]
    blocks = [b for b in blocks if b]
    if len(blocks) < folds + 1:
        raise ValueError(f"{len(ordered)} patients are too few for {folds} time-series folds")
    return [({p for b in blocks[: i + 1] for p in b}, set(blocks[i + 1])) for i in range(folds)]
