"""The curate step: an account's FHIR source → an immutable dataset snapshot for a run.

One bad record never fails a run: it is skipped and counted in the curation report. The run
fails only when the snapshot would be unusable, and the reason says what was skipped.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pml import events
from pml.accounts import get_account
from pml.app import App
from pml.blobs import BlobStore, sha256_bytes
from pml.datasets.images import ImageError, check_image, mask_values
from pml.datasets.snapshot import (
    SnapshotManifest,
    build_manifest,
    check_usable,
    snapshot_stats,
    store_manifest,
)
from pml.datasets.splits import SplitPolicy
from pml.errors import NotFound, require_id
from pml.fhir.attachments import attachment_bytes
from pml.fhir.prefilter import LinePrefilter
from pml.fhir.records import StoredImage, collect_records
from pml.fhir.report import CurationReport
from pml.fhir.sources import open_source
from pml.runs import RunStatus, get_run, run_step, set_status
from pml.schemas.config import ModelConfig
from pml.settings import Settings
from pml.store.tables import Snapshot, SnapshotExample


T = TypeVar("T")


@dataclass
class CurationResult:
    manifest: SnapshotManifest
    report: CurationReport


class BlobIntake:
    """Checks each attachment and writes it to the account's blob store as it is met.

    Small-file writes cost about a millisecond each on the filesystems seen here, so they go
    to a few writer threads while reading goes on; ``finish`` waits for them.
    """

    WRITERS = 4

    def __init__(self, blobs: BlobStore, root: Path | None, settings: Settings, allowed_hosts: frozenset[str]):
        self.blobs, self.root, self.settings, self.allowed_hosts = blobs, root, settings, allowed_hosts
        self._writers = ThreadPoolExecutor(self.WRITERS, thread_name_prefix="pml-blob")
        self._pending: list[Future[None]] = []

    def _store(self, data: bytes) -> str:
        sha = sha256_bytes(data)
        self._pending.append(self._writers.submit(self.blobs.put_hashed, sha, data))
        if len(self._pending) > 256:  # bound the bytes held in flight
            self._drain(128)
        return sha

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()  # re-raises a failed write

    def finish(self) -> None:
        try:
            self._drain()
        finally:
            self._writers.shutdown(wait=True)

    def _bytes(self, attachment: dict[str, Any]) -> tuple[bytes, str]:
        return attachment_bytes(attachment, self.root, self.settings.max_image_bytes, self.allowed_hosts)

    def image(self, attachment: dict[str, Any]) -> StoredImage:
        data, content_type = self._bytes(attachment)
        info = check_image(data, self.settings.max_image_pixels)
        return StoredImage(self._store(data), content_type, info.width, info.height)

    def mask(self, attachment: dict[str, Any]) -> StoredImage:
        data, content_type = self._bytes(attachment)
        if content_type != "image/png":
            raise ImageError("mask is not a PNG")
        check_image(data, self.settings.max_image_pixels)
        width, height, values = mask_values(data)
        return StoredImage(self._store(data), content_type, width, height, frozenset(values))


CurationProgress = Callable[[CurationReport], None]
# How often curation reports its progress while it reads (an event per call: keep it rare).
PROGRESS_EVERY_S = 2.0


def _reporting(items: Iterable[T], report: CurationReport, progress: CurationProgress | None) -> Iterator[T]:
    """Pass ``items`` through, calling ``progress`` every PROGRESS_EVERY_S seconds of reading."""
    last = time.monotonic()
    for item in items:
        yield item
        if progress is not None and time.monotonic() - last >= PROGRESS_EVERY_S:
            progress(report)
            last = time.monotonic()


def curate_snapshot(
    source_config: dict[str, Any], config: ModelConfig, blobs: BlobStore, settings: Settings,
    progress: CurationProgress | None = None,
) -> CurationResult:
    """Read the source, keep the usable examples, store their files and build the manifest.

    ``progress`` is called with the report while reading goes on and once reading is done.
    """
    report = CurationReport()
    problem = config.problem_definition
    source = open_source(source_config, problem.training_data_filter.codes)
    allowed = frozenset(h.lower() for h in source_config.get("attachmentHosts") or [])
    intake = BlobIntake(blobs, source.root, settings, allowed)
    codes = problem.training_data_filter.codes
    try:
        resources = _reporting(source.resources(report, LinePrefilter(codes)), report, progress)
        records = collect_records(resources, codes, report, intake)
    finally:
        intake.finish()
    if progress is not None:
        progress(report)
    label_index = config.label_index()
    index_to_name = {index + 1: name for name, index in label_index.items()}
    segmentation = problem.problem_type.is_segmentation

    examples: list[dict[str, Any]] = []
    for record in records.examples:
        key = f"{record.resource_type}/{record.id}"
        unknown = sorted(record.labels - label_index.keys())
        if unknown:
            report.skip(key, "label not among the config's labels")
            continue
        labels = sorted(record.labels)
        mask = record.mask
        if segmentation:
            if mask is None:
                report.skip(key, "no segmentation mask")
                continue
            if (mask.width, mask.height) != (record.image.width, record.image.height):
                report.skip(key, "mask size differs from its image")
                continue
            if mask.values - {0} - index_to_name.keys():
                report.skip(key, "mask has pixel values that are not label index + 1")
                continue
            labels = sorted(index_to_name[v] for v in mask.values if v)
        else:
            if not labels:
                report.skip(key, "no label")
                continue
            if len(labels) > 1 and not problem.multi_label:
                report.skip(key, "several labels for a single-label problem")
                continue
        examples.append(
            {
                "id": record.id,
                "resource_type": record.resource_type,
                "version": record.version,
                "patient": record.patient_id,
                "time": record.time.isoformat(),
                "_time": record.time,
                "image": record.image.sha256,
                "image_type": record.image.content_type,
                "mask": mask.sha256 if segmentation and mask else None,
                "labels": labels,
            }
        )
    report.examples = len(examples)
    patients = {
        pid: {"gender": info.gender, "birthDate": info.birth_date} for pid, info in records.patients.items()
    }
    manifest = build_manifest(
        problem_type=problem.problem_type.value,
        multi_label=problem.multi_label,
        labels=label_index,
        policy=SplitPolicy(**config.training_approach.split.model_dump()),
        patients=patients,
        examples=examples,
    )
    check_usable(manifest, report.summary())
    return CurationResult(manifest=manifest, report=report)


def save_snapshot(session: Session, account_id: str, blobs: BlobStore, manifest: SnapshotManifest) -> str:
    """Store the manifest and index its examples once; the same data gives the same id.

    Two runs may curate the same new snapshot at once: the second insert then meets the
    first one's rows, which are the same by construction, and keeps them.
    """
    snapshot_id, manifest_sha = store_manifest(blobs, manifest)
    if _snapshot_exists(session, account_id, snapshot_id):
        return snapshot_id
    try:
        with session.begin_nested():
            session.add(
                Snapshot(account_id=account_id, id=snapshot_id, manifest_sha256=manifest_sha,
                         stats=snapshot_stats(manifest))
            )
            session.add_all(
                SnapshotExample(
                    account_id=account_id, snapshot_id=snapshot_id, example_id=e.id, patient_id=e.patient,
                    split=e.split, image_sha256=e.image, mask_sha256=e.mask, labels=list(e.labels),
                )
                for e in manifest.examples
            )
    except IntegrityError:
        if not _snapshot_exists(session, account_id, snapshot_id):
            raise
    return snapshot_id


def _snapshot_exists(session: Session, account_id: str, snapshot_id: str) -> bool:
    query = select(Snapshot.id).where(Snapshot.account_id == account_id, Snapshot.id == snapshot_id)
    return session.scalar(query) is not None


def get_snapshot(session: Session, account_id: str, snapshot_id: str) -> tuple[Snapshot, list[SnapshotExample]]:
    require_id("snapshot_id", snapshot_id)
    snapshot = session.scalar(select(Snapshot).where(Snapshot.account_id == account_id, Snapshot.id == snapshot_id))
    if snapshot is None:
        raise NotFound(f"snapshot {snapshot_id} not found")
    examples = session.scalars(
        select(SnapshotExample)
        .where(SnapshotExample.account_id == account_id, SnapshotExample.snapshot_id == snapshot_id)
        .order_by(SnapshotExample.example_id)
    )
    return snapshot, list(examples)


def curate_run(app: App, account_id: str, run_id: str) -> bool:
    """The curator's step. Returns whether tuning should be enqueued."""

    def work() -> bool:
        with app.session() as session:
            run = get_run(session, account_id, run_id, for_update=True)
            if run.snapshot_id is not None:
                return run.status == RunStatus.TUNING.value  # done before; only re-enqueue
            if run.status not in (RunStatus.PENDING.value, RunStatus.CURATING.value):
                return False
            if run.status == RunStatus.PENDING.value:
                set_status(session, run, RunStatus.CURATING)
            source_config = dict(get_account(session, account_id).fhir_source)
            model_id = run.model_id
            config = ModelConfig.model_validate(run.config)
        blobs = app.blobs(account_id)

        def progress(report: CurationReport) -> None:
            with app.session() as session:
                events.publish(session, account_id, "curation.progress", run_id=run_id, model_id=model_id,
                               data={"resourcesRead": report.resources_read,
                                     "skipped": sum(report.skipped.values())})

        result = curate_snapshot(source_config, config, blobs, app.settings, progress)
        with app.session() as session:
            run = get_run(session, account_id, run_id, for_update=True)
            if run.status != RunStatus.CURATING.value:
                return False  # cancelled meanwhile
            run.snapshot_id = save_snapshot(session, account_id, blobs, result.manifest)
            run.curation_report = result.report.to_json()
            events.publish(
                session, account_id, "run.curated", run_id=run.id, model_id=run.model_id,
                data={"snapshotId": run.snapshot_id, "examples": result.report.examples,
                      "skipped": sum(result.report.skipped.values())},
            )
            set_status(session, run, RunStatus.TUNING)
        return True

    return run_step(app, account_id, run_id, "curate", work)
