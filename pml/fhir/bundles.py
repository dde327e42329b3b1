"""Writing records in pml's FHIR conventions (R4 JSON): for the demo, tests and users' tools.

The inverse of ``pml.fhir.records``: a DocumentReference per example, an Observation for
its labels, a mask DocumentReference for segmentation, and the Patient; one Bundle per patient.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pml.fhir.codes import LABEL_CODE, LABEL_SYSTEM, MASK_CODE


@dataclass
class PatientSpec:
    id: str
    gender: str
    birth_date: str


@dataclass
class ExampleSpec:
    id: str
    patient_id: str
    time: dt.datetime
    image: bytes
    code_system: str
    code: str
    labels: list[str] = field(default_factory=list)
    mask: bytes | None = None
    content_type: str = "image/png"
    image_url: str | None = None
    """Attach the image by this URL (relative to the source folder) instead of inline bytes."""


def patient_resource(patient: PatientSpec) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": patient.id, "gender": patient.gender, "birthDate": patient.birth_date}


def _attachment(data: bytes, content_type: str) -> dict[str, Any]:
    return {"contentType": content_type, "data": base64.b64encode(data).decode()}


def example_resources(example: ExampleSpec) -> list[dict[str, Any]]:
    when = example.time.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    ref = f"DocumentReference/{example.id}"
    if example.image_url:
        image = {"contentType": example.content_type, "url": example.image_url}
    else:
        image = _attachment(example.image, example.content_type)
    out: list[dict[str, Any]] = [
        {
            "resourceType": "DocumentReference",
            "id": example.id,
            "meta": {"versionId": "1", "lastUpdated": when},
            "status": "current",
            "type": {"coding": [{"system": example.code_system, "code": example.code}]},
            "subject": {"reference": f"Patient/{example.patient_id}"},
            "date": when,
            "content": [{"attachment": image}],
            "context": {"period": {"start": when}},
        }
    ]
    if example.labels:
        out.append(
            {
                "resourceType": "Observation",
                "id": f"{example.id}-label",
                "status": "final",
                "code": {"coding": [{"system": LABEL_SYSTEM, "code": LABEL_CODE}]},
                "subject": {"reference": f"Patient/{example.patient_id}"},
                "derivedFrom": [{"reference": ref}],
                "valueCodeableConcept": {"coding": [{"system": LABEL_SYSTEM, "code": name} for name in example.labels]},
            }
        )
    if example.mask is not None:
        out.append(
            {
                "resourceType": "DocumentReference",
                "id": f"{example.id}-mask",
                "status": "current",
                "type": {"coding": [{"system": LABEL_SYSTEM, "code": MASK_CODE}]},
                "subject": {"reference": f"Patient/{example.patient_id}"},
                "relatesTo": [{"code": "transforms", "target": {"reference": ref}}],
                "content": [{"attachment": _attachment(example.mask, "image/png")}],
            }
        )
    return out


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r} if r.get("id") else {"resource": r}
            for r in resources
        ],
    }


def write_patient_bundles(folder: Path, patients: list[PatientSpec], examples: list[ExampleSpec]) -> list[Path]:
    """One ``<patient>.json`` Bundle per patient, holding the patient and their examples."""
    folder.mkdir(parents=True, exist_ok=True)
    by_patient: dict[str, list[ExampleSpec]] = {}
    for example in examples:
        by_patient.setdefault(example.patient_id, []).append(example)
    written = []
    for patient in patients:
        resources = [patient_resource(patient)]
        for example in by_patient.get(patient.id, []):
            resources.extend(example_resources(example))
        path = folder / f"{patient.id}.json"
        path.write_text(json.dumps(bundle(resources)))
        written.append(path)
    return written
