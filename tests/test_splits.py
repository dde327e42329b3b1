"""Patient-grouped splits (time-based and stratified) and forward-chaining CV folds."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter

import pytest

from pml.datasets.splits import SplitItem, SplitPolicy, assign_splits, forward_chaining_folds

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def items(n_patients: int = 40, seed: int = 1) -> list[SplitItem]:
    rng = random.Random(seed)
    out = []
    for p in range(n_patients):
        label = rng.choice(["a", "a", "a", "b"])  # imbalanced, one label per patient
        for _ in range(rng.randint(1, 6)):
            out.append(SplitItem(f"p{p:03d}", T0 + dt.timedelta(days=rng.randint(0, 700)), label))
    return out


def latest_times(data: list[SplitItem]) -> dict[str, dt.datetime]:
    latest: dict[str, dt.datetime] = {}
    for item in data:
        latest[item.patient] = max(latest.get(item.patient, item.time), item.time)
    return latest


def test_patient_never_in_two_splits_and_newest_patients_are_in_test() -> None:
    data = items()
    splits = assign_splits(data, SplitPolicy())
    assert set(splits) == {i.patient for i in data}
    latest = latest_times(data)
    oldest_test = min(latest[p] for p, s in splits.items() if s == "test")
    newest_train = max(latest[p] for p, s in splits.items() if s == "train")
    assert oldest_test >= newest_train


@pytest.mark.parametrize("strategy", ["time", "stratified"])
def test_split_shares_follow_the_policy(strategy: str) -> None:
    data = items(300)
    splits = assign_splits(data, SplitPolicy(strategy=strategy, validation_fraction=0.1, test_fraction=0.3))
    counts = Counter(splits[i.patient] for i in data)
    assert 0.22 < counts["test"] / len(data) < 0.38, counts
    assert 0.05 < counts["validation"] / len(data) < 0.17, counts


def test_stratified_split_keeps_label_shares_and_groups() -> None:
    data = items(300)
    splits = assign_splits(data, SplitPolicy(strategy="stratified"))
    share = {
        split: Counter(i.label for i in data if splits[i.patient] == split)["b"]
        / max(1, sum(1 for i in data if splits[i.patient] == split))
        for split in ("train", "validation", "test")
    }
    overall = Counter(i.label for i in data)["b"] / len(data)
    assert all(abs(s - overall) < 0.08 for s in share.values()), (share, overall)


@pytest.mark.parametrize("strategy", ["time", "stratified"])
def test_splits_are_deterministic_and_order_independent(strategy: str) -> None:
    data = items()
    shuffled = data[:]
    random.Random(5).shuffle(shuffled)
    policy = SplitPolicy(strategy=strategy)
    assert assign_splits(data, policy) == assign_splits(shuffled, policy)


def test_three_patients_still_give_three_splits() -> None:
    data = [SplitItem("a", T0, ""), SplitItem("b", T0 + dt.timedelta(days=1), ""), SplitItem("c", T0 + dt.timedelta(days=2), "")]
    assert assign_splits(data, SplitPolicy()) == {"c": "test", "b": "validation", "a": "train"}


def test_forward_chaining_folds_train_on_the_past_and_validate_on_what_follows() -> None:
    data = items(60)
    latest = latest_times(data)
    folds = forward_chaining_folds(data, 3)
    assert len(folds) == 3
    previous_train: set[str] = set()
    for train, validation in folds:
        assert train and validation and not (train & validation)
        assert max(latest[p] for p in train) <= min(latest[p] for p in validation)
        assert previous_train < train, "each fold trains on more of the past"
        previous_train = train


def test_too_few_patients_for_the_folds_is_an_error() -> None:
    with pytest.raises(ValueError, match="too few"):
        forward_chaining_folds(items(3), 5)
