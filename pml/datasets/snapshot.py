"""Immutable, content-addressed dataset snapshots.

The id is the sha256 of a canonical manifest (every example's resource id and version, image
and mask hashes, labels, split, and the label index map), so curating unchanged data again
yields the same id and stores nothing new.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from pml.blobs import BlobStore, sha256_bytes
from pml.datasets.splits import (
    TEST,
    TRAIN,
    VALIDATION,
    SplitItem,
    SplitPolicy,
    assign_splits,
    forward_chaining_folds,
)
from pml.errors import StepFailed

MANIFEST_FORMAT = 1
SPLITS = (TRAIN, VALIDATION, TEST)


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class ManifestExample(_Camel):
    id: str
    resource_type: str
    version: str
    patient: str
    time: str
    split: str
    image: str  # sha256 of the image bytes
    image_type: str  # image/png | image/jpeg
    mask: str | None = None
    labels: list[str]


class SnapshotManifest(_Camel):
    format: int = MANIFEST_FORMAT
    problem_type: str
    multi_label: bool
    labels: dict[str, int]
    split_policy: SplitPolicy
    patients: dict[str, dict[str, str | None]]
    examples: list[ManifestExample]
    patients_in_two_splits: int = 0
    """Recorded when built, and checked again before the snapshot is used: always 0."""

    def canonical_bytes(self) -> bytes:
        data = self.model_dump(mode="json", by_alias=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def snapshot_id(self) -> str:
        return sha256_bytes(self.canonical_bytes())

    def split(self, name: str) -> list[ManifestExample]:
        return [e for e in self.examples if e.split == name]


def build_manifest(
    *,
    problem_type: str,
    multi_label: bool,
    labels: dict[str, int],
    policy: SplitPolicy,
    patients: dict[str, dict[str, str | None]],
    examples: list[dict[str, Any]],
) -> SnapshotManifest:
    """Assign splits and order everything canonically. ``examples`` lack only ``split``."""
    items = [SplitItem(e["patient"], e["_time"], e["labels"][0] if e["labels"] else "") for e in examples]
    splits = assign_splits(items, policy)
    rows = [
        ManifestExample(**{k: v for k, v in e.items() if not k.startswith("_")}, split=splits[e["patient"]])
        for e in sorted(examples, key=lambda e: (e["resource_type"], e["id"]))
    ]
    used = {e.patient for e in rows}
    manifest = SnapshotManifest(
        problem_type=problem_type,
        multi_label=multi_label,
        labels=dict(sorted(labels.items(), key=lambda kv: kv[1])),
        split_policy=policy,
        patients={p: patients[p] for p in sorted(used)},
        examples=rows,
    )
    return manifest.model_copy(update={"patients_in_two_splits": len(patients_in_two_splits(manifest))})


def cv_folds(manifest: SnapshotManifest, folds: int) -> list[tuple[list[ManifestExample], list[ManifestExample]]]:
    """Forward-chaining folds over the train and validation splits (the test split stays out)."""
    rows = [e for e in manifest.examples if e.split in (TRAIN, VALIDATION)]
    items = [SplitItem(e.patient, parse_time(e.time), e.labels[0] if e.labels else "") for e in rows]
    out = []
    for train_patients, validation_patients in forward_chaining_folds(items, folds):
        out.append(([e for e in rows if e.patient in train_patients], [e for e in rows if e.patient in validation_patients]))
    return out


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def patients_in_two_splits(manifest: SnapshotManifest) -> set[str]:
    """Patients found in more than one split; empty for every manifest pml writes."""
    seen: dict[str, set[str]] = {}
    for e in manifest.examples:
        seen.setdefault(e.patient, set()).add(e.split)
    return {p for p, s in seen.items() if len(s) > 1}


def snapshot_stats(manifest: SnapshotManifest) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for name in SPLITS:
        rows = manifest.split(name)
        label_counts: Counter[str] = Counter(label for e in rows for label in e.labels)
        times = sorted(e.time for e in rows)
        stats[name] = {
            "examples": len(rows),
            "patients": len({e.patient for e in rows}),
            "labels": dict(sorted(label_counts.items())),
            "timeRange": [times[0], times[-1]] if times else None,
        }
    return stats


def check_usable(manifest: SnapshotManifest, skipped_summary: str) -> None:
    """Fail the step when the snapshot could not train and test a model, saying why."""
    if not manifest.examples:
        raise StepFailed(f"no usable examples matched the filter ({skipped_summary})")
    for name in SPLITS:
        if not manifest.split(name):
            patients = len(manifest.patients)
            raise StepFailed(
                f"the {name} split is empty: {len(manifest.examples)} examples from {patients} patients "
                f"are too few to split by patient ({skipped_summary})"
            )
    in_train = {label for e in manifest.split(TRAIN) for label in e.labels}
    missing = [name for name in manifest.labels if name not in in_train]
    if missing:
        raise StepFailed(
            f"labels with no training example: {', '.join(missing)} ({skipped_summary})"
        )
    leaked = patients_in_two_splits(manifest)
    if leaked or manifest.patients_in_two_splits:  # cannot happen; checked because the promise matters
        raise StepFailed(f"{len(leaked)} patients appear in two splits")


def store_manifest(blobs: BlobStore, manifest: SnapshotManifest) -> tuple[str, str]:
    """Write the manifest once; returns ``(snapshot id, manifest blob sha)`` (the same hash)."""
    data = manifest.canonical_bytes()
    sha = blobs.put(data)
    return manifest.snapshot_id(), sha


def load_manifest(blobs: BlobStore, snapshot_id: str) -> SnapshotManifest:
    return SnapshotManifest.model_validate_json(blobs.read(snapshot_id))
