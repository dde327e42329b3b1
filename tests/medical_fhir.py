"""Test helper: the real medical data sets in ../shared/data as FHIR, by pml's conventions.

EBHI-Seg: one patient per slide id, images attached by relative URL, masks inline (foreground
labelled with the image's class). BreastMNIST: no patient ids exist, so each image is its own
patient; dates put MedMNIST's official test images last, so pml's time-based split matches it.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from pml.fhir.bundles import ExampleSpec, PatientSpec, write_patient_bundles

SYSTEM = "urn:pml:tests"
EBHI_CODE = "ebhi-tile"
BREAST_CODE = "breast-ultrasound"
EBHI_LABELS = ["Adenocarcinoma", "High-grade IN", "Low-grade IN", "Normal", "Polyp", "Serrated adenoma"]
BREAST_LABELS = ["malignant", "benign-or-normal"]
T0 = dt.datetime(2022, 1, 1, tzinfo=dt.timezone.utc)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Converted:
    folder: Path
    truth: dict[str, np.ndarray]  # example id → mask (seg) or label index array (clf)


def _spread(key: str) -> dt.timedelta:
    """A deterministic, well-mixed date offset within two years."""
    return dt.timedelta(minutes=int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % (730 * 24 * 60))


def ebhi_to_fhir(source: Path, folder: Path) -> Converted:
    rows = list(csv.DictReader(open(source / "labels.csv")))
    patients, examples, truth = {}, [], {}
    for row in rows:
        slide = row["slide_id"]
        patients[slide] = PatientSpec(id=f"slide-{slide}", gender="unknown", birth_date="1960")
        target = folder / "images" / row["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / row["image"], target)
        mask = np.asarray(Image.open(source / row["mask"]).convert("L"))
        labelled = np.where(mask > 127, int(row["class_index"]) + 1, 0).astype(np.uint8)
        example_id = "ebhi-" + Path(row["image"]).stem.lower()
        truth[example_id] = labelled
        spec = ExampleSpec(
            id=example_id, patient_id=f"slide-{slide}", time=T0 + _spread(slide), image=b"",
            image_url="images/" + quote(row["image"]), code_system=SYSTEM, code=EBHI_CODE, mask=_png(labelled),
        )
        examples.append(spec)
    write_patient_bundles(folder, list(patients.values()), examples)
    return Converted(folder, truth)


def breastmnist_to_fhir(npz: Path, folder: Path) -> Converted:
    data = np.load(npz)
    patients, examples, truth = [], [], {}
    offsets = {"train": (0, 500), "val": (500, 600), "test": (600, 700)}  # days: test is newest
    for split, (start, end) in offsets.items():
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        for i, (image, label) in enumerate(zip(images, labels)):
            example_id = f"breast-{split}-{i:03d}"
            patient_id = f"bp-{split}-{i:03d}"
            patients.append(PatientSpec(id=patient_id, gender="female", birth_date="1970"))
            when = T0 + dt.timedelta(days=start + (end - start) * i / len(images))
            examples.append(
                ExampleSpec(
                    id=example_id, patient_id=patient_id, time=when, image=_png(image),
                    code_system=SYSTEM, code=BREAST_CODE, labels=[BREAST_LABELS[int(label)]],
                )
            )
            truth[example_id] = np.array([int(label)])
    write_patient_bundles(folder, patients, examples)
    return Converted(folder, truth)
