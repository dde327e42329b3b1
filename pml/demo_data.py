"""The demo data set: scikit-learn's 1,797 real handwritten digits as FHIR R4 Bundles.

The images ship inside scikit-learn, so the demo runs on a fresh machine. Digits are spread
over 60 patients and two years; each patient's examples are close in time, so the newest
patients form the test split. The same records serve both problem types:
``urn:pml:demo|digit-image`` (classification, an Observation per example) and
``urn:pml:demo|digit-stroke`` (segmentation: stroke pixels labelled with the digit's class).
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from pml.fhir.bundles import ExampleSpec, PatientSpec, write_patient_bundles

DEMO_SYSTEM = "urn:pml:demo"
CLASSIFICATION_CODE = "digit-image"
SEGMENTATION_CODE = "digit-stroke"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PATIENTS = 60
START = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
SPAN = dt.timedelta(days=730)
# A pixel is stroke when its intensity (0-16 in the source) is above this.
STROKE_THRESHOLD = 6


@dataclass(frozen=True)
class DemoDigit:
    index: int
    patient_id: str
    digit: int
    pixels: np.ndarray  # uint8, 8x8, 0-255

    @property
    def mask(self) -> np.ndarray:
        """Stroke pixels carry the digit's label index + 1; background 0."""
        return np.where(self.pixels > STROKE_THRESHOLD * 255 // 16, self.digit + 1, 0).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def demo_digits() -> list[DemoDigit]:
    digits = load_digits()
    n = len(digits.target)
    out = []
    for i in range(n):
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        out.append(DemoDigit(i, f"demo-patient-{i * PATIENTS // n:03d}", int(digits.target[i]), pixels))
    return out


def classification_example_id(digit: DemoDigit) -> str:
    return f"digit-{digit.index:04d}"


def segmentation_example_id(digit: DemoDigit) -> str:
    return f"digit-stroke-{digit.index:04d}"


def write_demo_fhir(folder: Path) -> list[DemoDigit]:
    """Write the Bundles (one per patient) and return the digits they hold."""
    digits = demo_digits()
    n = len(digits)
    patients = [
        PatientSpec(id=f"demo-patient-{k:03d}", gender="female" if k % 2 else "male", birth_date=f"{1940 + k}-06-01")
        for k in range(PATIENTS)
    ]
    examples = []
    for d in digits:
        time = START + SPAN * d.index / n
        image = _png(d.pixels)
        examples.append(
            ExampleSpec(
                id=classification_example_id(d), patient_id=d.patient_id, time=time, image=image,
                code_system=DEMO_SYSTEM, code=CLASSIFICATION_CODE, labels=[DIGIT_NAMES[d.digit]],
            )
        )
        examples.append(
            ExampleSpec(
                id=segmentation_example_id(d), patient_id=d.patient_id, time=time, image=image,
                code_system=DEMO_SYSTEM, code=SEGMENTATION_CODE, mask=_png(d.mask),
            )
        )
    write_patient_bundles(folder, patients, examples)
    return digits


def png_bytes(digit: DemoDigit) -> bytes:
    return _png(digit.pixels)
