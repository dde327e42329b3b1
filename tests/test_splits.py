"""Patient-grouped, time-based splits."""

from __future__ import annotations

import datetime as dt
import random

from pml.datasets.splits import SplitPolicy, assign_splits

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def examples(n_patients: int = 40, seed: int = 1) -> list[tuple[str, dt.datetime]]:
    rng = random.Random(seed)
    out = []
    for p in range(n_patients):
        for _ in range(rng.randint(1, 6)):
            out.append((f"p{p:02d}", T0 + dt.timedelta(days=rng.randint(0, 700))))
    return out


def test_patient_never_in_two_splits_and_newest_patients_are_in_test() -> None:
    data = examples()
    splits = assign_splits(data, SplitPolicy())
    assert set(splits) == {p for p, _ in data}
    latest: dict[str, dt.datetime] = {}
    for patient, time in data:
        latest[patient] = max(latest.get(patient, time), time)
    oldest_test = min(latest[p] for p, s in splits.items() if s == "test")
    newest_train = max(latest[p] for p, s in splits.items() if s == "train")
    assert oldest_test >= newest_train


def test_split_shares_follow_the_policy() -> None:
    data = examples(200)
    splits = assign_splits(data, SplitPolicy(validation_fraction=0.1, test_fraction=0.3))
    counts = {"train": 0, "validation": 0, "test": 0}
    for patient, _ in data:
        counts[splits[patient]] += 1
    total = len(data)
    assert 0.28 < counts["test"] / total < 0.36
    assert 0.08 < counts["validation"] / total < 0.16


def test_splits_are_deterministic_and_order_independent() -> None:
    data = examples()
    shuffled = data[:]
    random.Random(5).shuffle(shuffled)
    assert assign_splits(data, SplitPolicy()) == assign_splits(shuffled, SplitPolicy())


def test_three_patients_still_give_three_splits() -> None:
    data = [("a", T0), ("b", T0 + dt.timedelta(days=1)), ("c", T0 + dt.timedelta(days=2))]
    assert assign_splits(data, SplitPolicy()) == {"c": "test", "b": "validation", "a": "train"}
