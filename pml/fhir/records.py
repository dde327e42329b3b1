"""pml's FHIR conventions: which records are examples, labels and masks (see the README).

- example: a DocumentReference (or R4 Media) whose ``type`` (or ``code``/``category``)
  carries a filter code, with ``subject`` → Patient, a time and an image attachment;
- classification label: an Observation coded ``urn:pml:label|label``, ``derivedFrom`` the
  example, whose ``valueCodeableConcept`` codes are label names;
- segmentation mask: a DocumentReference typed ``urn:pml:label|mask``, ``relatesTo`` the
  example, a PNG whose pixel value is label index + 1 (0 = background).

Resources are filtered on the parsed JSON first and only the ones that matter are validated
with fhir.resources, which is far slower than parsing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import orjson
from pydantic import ValidationError

from pml.fhir.codes import LABEL_CODE, LABEL_SYSTEM, MASK_CODE
from pml.fhir.dates import parse_fhir_datetime
from pml.fhir.report import CurationReport
from pml.fhir.sources.base import RawResource

FINAL_STATUSES = {"final", "amended", "corrected"}
RELEVANT = frozenset({"Patient", "DocumentReference", "Media", "Observation"})


@dataclass
class PatientInfo:
    gender: str | None = None
    birth_date: str | None = None


@dataclass(frozen=True)
class StoredImage:
    """An attachment already decoded, checked and written to the blob store."""

    sha256: str
    content_type: str
    width: int
    height: int
    values: frozenset[int] = frozenset()  # pixel values, for masks


class AttachmentIntake(Protocol):
    """Turns an attachment into a stored image; raises ValueError with the reason."""

    def image(self, attachment: dict[str, Any]) -> StoredImage: ...

    def mask(self, attachment: dict[str, Any]) -> StoredImage: ...


@dataclass
class ExampleRecord:
    """An example whose image is stored; only ids, times and hashes are kept in memory."""

    resource_type: str
    id: str
    version: str
    patient_id: str
    time: dt.datetime
    image: StoredImage
    labels: set[str] = field(default_factory=set)
    mask: StoredImage | None = None


@dataclass
class CollectedRecords:
    patients: dict[str, PatientInfo]
    examples: list[ExampleRecord]


def _codings(resource: dict[str, Any], *keys: str) -> Iterable[dict[str, Any]]:
    for key in keys:
        value = resource.get(key)
        concepts = value if isinstance(value, list) else [value]
        for concept in concepts:
            if isinstance(concept, dict):
                for coding in concept.get("coding") or []:
                    if isinstance(coding, dict):
                        yield coding


def _matches(codings: Iterable[dict[str, Any]], codes: set[str]) -> bool:
    for coding in codings:
        code = coding.get("code")
        if code in codes or f"{coding.get('system')}|{code}" in codes:
            return True
    return False


def _is_label(resource: dict[str, Any], code: str) -> bool:
    return any(c.get("system") == LABEL_SYSTEM and c.get("code") == code for c in _codings(resource, "type", "code"))


URN_PREFIXES = ("urn:uuid:", "urn:oid:")


def _reference_id(reference: Any, resource_types: tuple[str, ...]) -> str | None:
    """``Type/id`` of a reference; a ``urn:uuid:`` reference is returned as it is, to be
    resolved through the Bundle entries' fullUrls once the whole source has been read."""
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    ref = reference["reference"].split("/_history/")[0]
    if ref.startswith(URN_PREFIXES):
        return ref
    parts = ref.rsplit("/", 2)
    if len(parts) >= 2 and parts[-2] in resource_types and parts[-1]:
        return f"{parts[-2]}/{parts[-1]}"
    return None


def _version_key(resource: dict[str, Any]) -> tuple[int, str]:
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    version = str(meta.get("versionId") or "")
    updated = parse_fhir_datetime(meta.get("lastUpdated"))
    return (int(version) if version.isdigit() else 0, updated.isoformat() if updated else "")


def _validate(resource: dict[str, Any]) -> str | None:
    """None when the resource validates as R4/R4B or R5; otherwise a short reason (no values)."""
    kind = resource["resourceType"]
    errors: list[str] = []
    for package in ("fhir.resources.R4B", "fhir.resources"):
        try:
            module = __import__(f"{package}.{kind.lower()}", fromlist=[kind])
        except ImportError:
            continue
        try:
            getattr(module, kind).model_validate(resource)
            return None
        except (ValidationError, ValueError, TypeError) as exc:
            if isinstance(exc, ValidationError) and exc.errors():
                first = exc.errors()[0]
                errors.append(".".join(str(p) for p in first["loc"]) + f" ({first['type']})")
            else:
                errors.append(type(exc).__name__)
    return f"invalid {kind}: {errors[0] if errors else 'unknown type'}"


def _example_time(resource: dict[str, Any]) -> dt.datetime | None:
    context = resource.get("context")
    candidates: list[Any] = []
    if isinstance(context, dict):  # R4: context.period
        candidates.append((context.get("period") or {}).get("start"))
    candidates.append((resource.get("period") or {}).get("start") if isinstance(resource.get("period"), dict) else None)
    candidates.append(resource.get("createdDateTime"))  # R4 Media
    candidates.append(resource.get("date"))
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    candidates.append(meta.get("lastUpdated"))
    for value in candidates:
        parsed = parse_fhir_datetime(value)
        if parsed is not None:
            return parsed
    return None


def _attachment(resource: dict[str, Any]) -> dict[str, Any] | None:
    if resource["resourceType"] == "Media":
        content = resource.get("content")
        return content if isinstance(content, dict) else None
    contents = resource.get("content")
    if isinstance(contents, list) and contents and isinstance(contents[0], dict):
        attachment = contents[0].get("attachment")
        return attachment if isinstance(attachment, dict) else None
    return None


class _Latest:
    """Which version of each resource wins: the highest ``meta.versionId``/``lastUpdated``.

    A version older than one already seen is skipped unprocessed, so duplicates cost little.
    """

    def __init__(self, report: CurationReport):
        self.report = report
        self.best: dict[str, tuple[int, str, str]] = {}

    def newer(self, key: str, resource: dict[str, Any]) -> bool:
        # Equal versions are ordered by content, so the file order never decides.
        version = (*_version_key(resource), hashlib.sha256(orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)).hexdigest())
        old = self.best.get(key)
        if old is not None:
            self.report.skip(key, "duplicate resource (kept the latest version)")
            if version < old:
                return False
        self.best[key] = version
        return True


def _example(resource: dict[str, Any], key: str, intake: AttachmentIntake, report: CurationReport) -> ExampleRecord | None:
    reason = _validate(resource)
    if reason:
        report.skip(key, reason)
        return None
    patient_ref = _reference_id(resource.get("subject"), ("Patient",))
    if patient_ref is None:
        report.skip(key, "no subject Patient")
        return None
    time = _example_time(resource)
    if time is None:
        report.skip(key, "no date (context.period.start, date or meta.lastUpdated)")
        return None
    attachment = _attachment(resource)
    if attachment is None:
        report.skip(key, "no image attachment")
        return None
    try:
        image = intake.image(attachment)
    except ValueError as exc:
        report.skip(key, str(exc))
        return None
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    return ExampleRecord(
        resource_type=resource["resourceType"], id=resource["id"], version=str(meta.get("versionId") or ""),
        patient_id=patient_ref if patient_ref.startswith(URN_PREFIXES) else patient_ref.split("/", 1)[1],
        time=time, image=image,
    )


def _mask(resource: dict[str, Any], key: str, intake: AttachmentIntake, report: CurationReport) -> tuple[list[str], StoredImage] | None:
    reason = _validate(resource)
    if reason:
        report.skip(key, reason)
        return None
    attachment = _attachment(resource)
    targets = [
        _reference_id((r or {}).get("target"), ("DocumentReference", "Media"))
        for r in resource.get("relatesTo") or []
        if isinstance(r, dict)
    ]
    targets = [t for t in targets if t]
    if attachment is None or not targets:
        report.skip(key, "mask without an attachment or a relatesTo example")
        return None
    try:
        return targets, intake.mask(attachment)
    except ValueError as exc:
        report.skip(key, f"mask: {exc}")
        return None


def _labels(obs: dict[str, Any], key: str, report: CurationReport) -> tuple[list[str], set[str]] | None:
    reason = _validate(obs)
    if reason:
        report.skip(key, reason)
        return None
    if obs.get("status") not in FINAL_STATUSES:
        report.skip(key, "label observation is not final")
        return None
    names = {c.get("code") for c in _codings(obs, "valueCodeableConcept") if isinstance(c.get("code"), str)}
    targets = [_reference_id(r, ("DocumentReference", "Media")) for r in obs.get("derivedFrom") or []]
    targets = [t for t in targets if t]
    if not names or not targets:
        report.skip(key, "label observation without a value or a derivedFrom example")
        return None
    return targets, names  # type: ignore[return-value]


def collect_records(
    stream: Iterable[RawResource], codes: list[str], report: CurationReport, intake: AttachmentIntake
) -> CollectedRecords:
    """Pass once over the source; images go to the blob store as they are met.

    Memory holds ids, times and hashes only, so it stays flat however large the images.
    Filtering happens on the parsed JSON first: only the resources that matter are
    validated with fhir.resources.
    """
    code_set = set(codes)
    latest = _Latest(report)
    patients: dict[str, PatientInfo] = {}
    examples: dict[str, ExampleRecord] = {}
    labels: dict[str, tuple[list[str], set[str]]] = {}
    masks: dict[str, tuple[list[str], StoredImage]] = {}
    aliases: dict[str, str] = {}  # Bundle entry fullUrl → "Type/id"

    for raw in stream:
        report.resources_read += 1  # (lines a prefilter skipped are counted by the source)
        resource = raw.resource
        kind = resource["resourceType"]
        if kind not in RELEVANT:
            continue
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            if kind != "Patient" and _matches(_codings(resource, "type", "code", "category"), code_set):
                report.skip(raw.origin, f"{kind} without an id")
            continue
        key = f"{kind}/{rid}"
        if raw.full_url:
            aliases[raw.full_url] = key
        if kind == "Patient":
            if latest.newer(key, resource):
                patients[rid] = PatientInfo(gender=resource.get("gender"), birth_date=resource.get("birthDate"))
        elif kind == "Observation":
            if _is_label(resource, LABEL_CODE) and latest.newer(key, resource):
                labels.pop(key, None)
                found = _labels(resource, key, report)
                if found:
                    labels[key] = found
        elif _is_label(resource, MASK_CODE):
            if latest.newer(key, resource):
                masks.pop(key, None)
                mask = _mask(resource, key, intake, report)
                if mask:
                    masks[key] = mask
        elif _matches(_codings(resource, "type", "code", "category"), code_set) and latest.newer(key, resource):
            examples.pop(key, None)
            example = _example(resource, key, intake, report)
            if example:
                examples[key] = example

    for targets, names in labels.values():
        for target in targets:
            target = aliases.get(target, target)
            if target in examples:
                examples[target].labels.update(names)
    for key, (targets, mask) in sorted(masks.items()):
        for target in targets:
            example = examples.get(aliases.get(target, target))
            if example is None:
                continue
            if example.mask is not None:
                report.skip(key, "second mask for one example (kept the first)")
                continue
            example.mask = mask

    kept: list[ExampleRecord] = []
    for key, example in sorted(examples.items()):
        if example.patient_id.startswith(URN_PREFIXES):
            resolved = aliases.get(example.patient_id, "")
            example.patient_id = resolved.split("/", 1)[1] if resolved.startswith("Patient/") else ""
        if example.patient_id not in patients:
            report.skip(key, "unknown patient (no Patient resource in the source)")
            continue
        kept.append(example)
    return CollectedRecords(patients=patients, examples=kept)
