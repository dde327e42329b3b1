"""Curation: awkward records are skipped with their reason; snapshots are content-addressed."""

from __future__ import annotations

import base64
import io
import datetime as dt
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pml.blobs import BlobStore
from pml.curation import curate_snapshot
from pml.demo import digits_config
from pml.demo_data import DEMO_SYSTEM, DIGIT_NAMES, demo_digits, png_bytes
from pml.errors import StepFailed
from pml.fhir.bundles import ExampleSpec, PatientSpec, bundle, write_patient_bundles
from pml.fhir.dates import parse_fhir_datetime
from pml.schemas.config import ModelConfig, assign_labels, parse_model_config
from pml.settings import Settings

CODE = "digit-image"
SEG_CODE = "digit-stroke"
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def config(problem_type: str = "imgClf") -> ModelConfig:
    return assign_labels(parse_model_config(digits_config(problem_type)))


def write_good(folder: Path, n: int = 200, patients: int = 20) -> None:
    digits = demo_digits()[:n]
    specs = [PatientSpec(f"p{k:02d}", "female", "1970-01-01") for k in range(patients)]
    examples = [
        ExampleSpec(
            id=f"d{d.index}", patient_id=f"p{d.index * patients // n:02d}", time=T0 + dt.timedelta(days=d.index),
            image=png_bytes(d), code_system=DEMO_SYSTEM, code=CODE, labels=[DIGIT_NAMES[d.digit]],
        )
        for d in digits
    ]
    write_patient_bundles(folder, specs, examples)


def doc(rid: str, **extra: object) -> dict:
    base = {
        "resourceType": "DocumentReference", "id": rid, "status": "current",
        "type": {"coding": [{"system": DEMO_SYSTEM, "code": CODE}]},
        "subject": {"reference": "Patient/p00"}, "date": "2023-06-01T00:00:00Z",
        "content": [{"attachment": {"contentType": "image/png", "data": base64.b64encode(png_bytes(demo_digits()[0])).decode()}}],
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def label(rid: str, target: str, name: str = "zero", status: str = "final") -> dict:
    return {
        "resourceType": "Observation", "id": rid, "status": status,
        "code": {"coding": [{"system": "urn:pml:label", "code": "label"}]},
        "derivedFrom": [{"reference": f"DocumentReference/{target}"}],
        "valueCodeableConcept": {"coding": [{"code": name}]},
    }


def att(data: bytes, content_type: str = "image/png") -> dict:
    return {"attachment": {"contentType": content_type, "data": base64.b64encode(data).decode()}}


def noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A tiny file that claims 12,000 x 12,000 pixels."""
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


def mask_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def media(rid: str) -> dict:
    """An R4 Media example (content is one Attachment, the time is createdDateTime)."""
    return {
        "resourceType": "Media", "id": rid, "status": "completed",
        "type": {"coding": [{"system": DEMO_SYSTEM, "code": CODE}]},
        "subject": {"reference": "Patient/p01"}, "createdDateTime": "2023-02-01",
        "content": {"contentType": "image/png", "data": base64.b64encode(png_bytes(demo_digits()[3])).decode()},
    }


def curate(folder: Path, tmp_path: Path, problem: str = "imgClf"):  # type: ignore[no-untyped-def]
    settings = Settings(home=tmp_path / "home", max_image_bytes=30_000, max_image_pixels=100_000_000)
    blobs = BlobStore(tmp_path / "blobs")
    return curate_snapshot({"type": "folder", "path": str(folder)}, config(problem), blobs, settings), blobs


@pytest.fixture
def awkward(tmp_path: Path) -> Path:
    folder = tmp_path / "fhir"
    write_good(folder)
    (folder / "nested" / "deeper").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(demo_digits()[1]))
    os.symlink(outside, folder / "link.png")
    records = [
        doc("no-subject", subject=None), label("l-no-subject", "no-subject"),
        doc("unknown-patient", subject={"reference": "Patient/nobody"}), label("l-unknown", "unknown-patient"),
        doc("no-image", content=[{"attachment": {"contentType": "image/png"}}]), label("l-no-image", "no-image"),
        doc("text", content=[{"attachment": {"contentType": "text/plain", "data": "aGk="}}]), label("l-text", "text"),
        doc("garbage", content=[{"attachment": {"contentType": "image/png", "data": base64.b64encode(b"not a png").decode()}}]),
        label("l-garbage", "garbage"),
        doc("escape", content=[{"attachment": {"contentType": "image/png", "url": "../outside.png"}}]), label("l-escape", "escape"),
        doc("symlink", content=[{"attachment": {"contentType": "image/png", "url": "link.png"}}]), label("l-symlink", "symlink"),
        doc("file-url", content=[{"attachment": {"contentType": "image/png", "url": "file:///etc/hostname"}}]),
        label("l-file-url", "file-url"),
        doc("http-url", content=[{"attachment": {"contentType": "image/png", "url": "http://example.org/a.png"}}]),
        label("l-http", "http-url"),
        doc("strange-label"), label("l-strange", "strange-label", name="eleven"),
        doc("unlabelled"),
        doc("draft-label"), label("l-draft", "draft-label", status="preliminary"),
        doc("two-labels"), label("l-two-a", "two-labels", "one"), label("l-two-b", "two-labels", "two"),
        doc("no-date", date=None), label("l-no-date", "no-date"),
        doc("bad-type", subject="Patient/p00"),
        {"resourceType": "Observation"},
        doc("too-big", content=[att(noise_png(200))]), label("l-too-big", "too-big"),
        doc("bomb", content=[att(bomb_png())]), label("l-bomb", "bomb"),
        doc("truncated-jpeg", content=[att(jpeg()[:200], "image/jpeg")]), label("l-trunc", "truncated-jpeg"),
        doc("gif", content=[att(gif())]), label("l-gif", "gif"),
        doc("no-content-type", content=[{"attachment": {"data": base64.b64encode(png_bytes(demo_digits()[2])).decode()}}]),
        label("l-no-ct", "no-content-type"),
        doc("orphan-label"), {**label("l-orphan", "orphan-label"), "derivedFrom": []},
        {k: v for k, v in doc("x").items() if k != "id"},
        doc("group-subject", subject={"reference": "Group/g1"}), label("l-group", "group-subject"),
        # awkward but usable: each must be kept
        media("media-r4"), {**label("l-media", "media-r4", "three"), "derivedFrom": [{"reference": "Media/media-r4"}]},
        doc("year-only", date=None, context={"period": {"start": "2021"}}), label("l-year", "year-only", "four"),
        doc("absolute-subject", subject={"reference": "http://fhir.example/r4/Patient/p01"}),
        label("l-abs", "absolute-subject", "five"),
        doc("amended"), label("l-amended", "amended", "six", status="amended"),
        doc("versioned-ref"), {**label("l-ver", "versioned-ref", "seven"),
                               "derivedFrom": [{"reference": "DocumentReference/versioned-ref/_history/3"}]},
    ]
    (folder / "nested" / "deeper" / "awkward.json").write_text(json.dumps(bundle(records)))
    ndjson = [json.dumps(r) for r in (doc("dup", meta={"versionId": "1"}), label("l-dup", "dup", "one"))]
    ndjson += ["{broken", json.dumps({"no": "resourceType"})]
    ndjson += [json.dumps(doc("dup", meta={"versionId": "2"}))]
    with gzip.open(folder / "nested" / "export.ndjson.gz", "wt") as handle:
        handle.write("\n".join(ndjson) + "\n")
    (folder / "broken.json").write_text("[1, 2")
    (folder / "corrupt.json.gz").write_bytes(b"not gzip at all")
    (folder / "single-resource.json").write_text(json.dumps(doc("single"))) 
    (folder / "single-label.json").write_text(json.dumps(label("l-single", "single", "eight")))
    nested = bundle([doc("nested")])
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": nested, "request": {"method": "POST", "url": "Bundle"}},
        {"resource": label("l-nested", "nested", "nine"), "request": {"method": "PUT", "url": "Observation/l-nested"}},
    ]}
    (folder / "transaction.json").write_text(json.dumps(transaction))
    (folder / "bundle-without-resource.json").write_text(json.dumps({"resourceType": "Bundle", "entry": [{"fullUrl": "x"}]}))
    return folder


def test_awkward_records_are_skipped_with_their_reason(awkward: Path, tmp_path: Path) -> None:
    result, _ = curate(awkward, tmp_path)
    skipped = result.report.to_json()["skipped"]
    records = result.report.to_json()["skippedRecords"]
    expected = {
        "no subject Patient": "DocumentReference/no-subject",
        "unknown patient (no Patient resource in the source)": "DocumentReference/unknown-patient",
        "attachment has neither data nor url": "DocumentReference/no-image",
        "content type 'text/plain' is not image/png or image/jpeg": "DocumentReference/text",
        "image cannot be decoded": "DocumentReference/garbage",
        "attachment URL points outside the source folder": "DocumentReference/escape",
        "attachment host 'example.org' is not on the account's allow-list": "DocumentReference/http-url",
        "label not among the config's labels": "DocumentReference/strange-label",
        "no label": "DocumentReference/unlabelled",
        "label observation is not final": "Observation/l-draft",
        "several labels for a single-label problem": "DocumentReference/two-labels",
        "no date (context.period.start, date or meta.lastUpdated)": "DocumentReference/no-date",
        "duplicate resource (kept the latest version)": "DocumentReference/dup",
        "invalid JSON line": "nested/export.ndjson.gz:3",
        "not a FHIR resource (no resourceType)": "nested/export.ndjson.gz:4",
        "invalid JSON": "broken.json",
        "bundle entry without a resource": "bundle-without-resource.json#entry[0]",
        "inline image is larger than the limit": "DocumentReference/too-big",
        "image is a decompression bomb": "DocumentReference/bomb",
        "image format GIF is not PNG or JPEG": "DocumentReference/gif",
        "content type '(none)' is not image/png or image/jpeg": "DocumentReference/no-content-type",
        "label observation without a value or a derivedFrom example": "Observation/l-orphan",
        "DocumentReference without an id": "nested/deeper/awkward.json#entry[",
        "unreadable file (BadGzipFile)": "corrupt.json.gz",
    }
    for reason, record in expected.items():
        assert reason in skipped, f"{reason!r} not reported; got {skipped}"
        assert any(r.startswith(record) for r in records[reason]), (reason, records[reason])
    assert "DocumentReference/truncated-jpeg" in records["image cannot be decoded"]
    assert "DocumentReference/group-subject" in records["no subject Patient"]
    assert "DocumentReference/orphan-label" in records["no label"]
    # symlink and file:// escapes are the same confinement reason
    assert "DocumentReference/symlink" in records["attachment URL points outside the source folder"]
    assert "DocumentReference/file-url" in records["attachment URL points outside the source folder"]
    assert any(r.startswith("invalid DocumentReference: subject") for r in skipped), skipped
    kept = {e.id for e in result.manifest.examples}
    awkward_but_usable = {"dup", "media-r4", "year-only", "absolute-subject", "amended", "versioned-ref", "single", "nested"}
    assert awkward_but_usable <= kept, awkward_but_usable - kept
    assert result.report.examples == 200 + len(awkward_but_usable), "every usable record is kept"
    year_only = next(e for e in result.manifest.examples if e.id == "year-only")
    assert year_only.time.startswith("2021-01-01T00:00:00")


def test_duplicate_keeps_the_latest_version(awkward: Path, tmp_path: Path) -> None:
    result, _ = curate(awkward, tmp_path)
    # version 2 of "dup" has no label of its own resource, but the label points at the id
    dup = [e for e in result.manifest.examples if e.id == "dup"]
    assert len(dup) == 1 and dup[0].version == "2"


def test_same_data_gives_the_same_snapshot_and_stores_nothing_new(tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    write_good(folder)
    first, blobs = curate(folder, tmp_path)
    files = sorted(p for p in blobs.root.rglob("*") if p.is_file())
    second, _ = curate(folder, tmp_path)
    assert first.manifest.snapshot_id() == second.manifest.snapshot_id()
    assert sorted(p for p in blobs.root.rglob("*") if p.is_file()) == files
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in files)
    assert all((p.stat().st_mode & 0o222) == 0 for p in files), "blobs are read-only"


def test_changed_label_changes_the_snapshot_id(tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    write_good(folder)
    first, _ = curate(folder, tmp_path)
    path = folder / "p00.json"
    data = json.loads(path.read_text())
    obs = next(e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Observation")
    obs["valueCodeableConcept"]["coding"][0]["code"] = "nine" if obs["valueCodeableConcept"]["coding"][0]["code"] != "nine" else "one"
    path.write_text(json.dumps(data))
    second, _ = curate(folder, tmp_path)
    assert first.manifest.snapshot_id() != second.manifest.snapshot_id()


def test_unusable_snapshot_fails_with_what_was_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    folder.mkdir()
    (folder / "only.json").write_text(json.dumps(bundle([doc("lonely"), label("l", "lonely")])))
    with pytest.raises(StepFailed, match=r"no usable examples.*unknown patient"):
        curate(folder, tmp_path)


def test_label_missing_from_training_fails_the_snapshot(tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    image = png_bytes(demo_digits()[0])
    specs = [PatientSpec(f"p{k}", "male", "1960-01-01") for k in range(10)]
    examples = [  # "nine" only for the newest patient, who lands in test
        ExampleSpec(
            id=f"e{i}", patient_id=f"p{i // 10}", time=T0 + dt.timedelta(days=i), image=image,
            code_system=DEMO_SYSTEM, code=CODE, labels=["nine" if i >= 90 else DIGIT_NAMES[i % 9]],
        )
        for i in range(100)
    ]
    write_patient_bundles(folder, specs, examples)
    with pytest.raises(StepFailed, match="labels with no training example: nine"):
        curate(folder, tmp_path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2020", "2020-01-01T00:00:00+00:00"),
        ("2020-05", "2020-05-01T00:00:00+00:00"),
        ("2020-05-06", "2020-05-06T00:00:00+00:00"),
        ("2020-05-06T10:00:00Z", "2020-05-06T10:00:00+00:00"),
        ("2020-05-06T10:00:00+02:00", "2020-05-06T08:00:00+00:00"),
        ("2020-05-06T10:00:00", "2020-05-06T10:00:00+00:00"),
    ],
)
def test_fhir_dates_of_any_precision(value: str, expected: str) -> None:
    parsed = parse_fhir_datetime(value)
    assert parsed is not None and parsed.isoformat() == expected


def test_segmentation_mask_problems_are_skipped_with_their_reason(tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    digits = demo_digits()[:120]
    specs = [PatientSpec(f"p{k:02d}", "male", "1980-01-01") for k in range(12)]
    good = [
        ExampleSpec(id=f"s{d.index}", patient_id=f"p{d.index // 10:02d}", time=T0 + dt.timedelta(days=d.index),
                    image=png_bytes(d), code_system=DEMO_SYSTEM, code=SEG_CODE, mask=mask_png(d.mask))
        for d in digits
    ]
    d = digits[0]
    wrong_size = mask_png(np.zeros((4, 4), dtype=np.uint8))
    bad_values = mask_png(np.full((8, 8), 200, dtype=np.uint8))
    awkward = [
        ExampleSpec(id="mask-size", patient_id="p00", time=T0, image=png_bytes(d), code_system=DEMO_SYSTEM,
                    code=SEG_CODE, mask=wrong_size),
        ExampleSpec(id="mask-values", patient_id="p00", time=T0, image=png_bytes(d), code_system=DEMO_SYSTEM,
                    code=SEG_CODE, mask=bad_values),
        ExampleSpec(id="no-mask", patient_id="p00", time=T0, image=png_bytes(d), code_system=DEMO_SYSTEM, code=SEG_CODE),
    ]
    write_patient_bundles(folder, specs, good + awkward)
    extra = [
        doc("jpeg-mask", type={"coding": [{"system": DEMO_SYSTEM, "code": SEG_CODE}]}),
        {"resourceType": "DocumentReference", "id": "jpeg-mask-mask", "status": "current",
         "type": {"coding": [{"system": "urn:pml:label", "code": "mask"}]},
         "relatesTo": [{"code": "transforms", "target": {"reference": "DocumentReference/jpeg-mask"}}],
         "content": [att(jpeg(), "image/jpeg")]},
        {"resourceType": "DocumentReference", "id": "s1-second-mask", "status": "current",
         "type": {"coding": [{"system": "urn:pml:label", "code": "mask"}]},
         "relatesTo": [{"code": "transforms", "target": {"reference": "DocumentReference/s1"}}],
         "content": [att(mask_png(digits[1].mask))]},
        {"resourceType": "DocumentReference", "id": "lost-mask", "status": "current",
         "type": {"coding": [{"system": "urn:pml:label", "code": "mask"}]},
         "content": [att(mask_png(digits[1].mask))]},
    ]
    (folder / "extra.json").write_text(json.dumps(bundle(extra)))
    result, _ = curate(folder, tmp_path, "imgSeg")
    report = result.report.to_json()
    expected = {
        "mask size differs from its image": "DocumentReference/mask-size",
        "mask has pixel values that are not label index + 1": "DocumentReference/mask-values",
        "no segmentation mask": "DocumentReference/no-mask",
        "mask: mask is not a PNG": "DocumentReference/jpeg-mask-mask",
        "second mask for one example (kept the first)": "DocumentReference/s1-second-mask",
        "mask without an attachment or a relatesTo example": "DocumentReference/lost-mask",
    }
    for reason, record in expected.items():
        assert record in report["skippedRecords"].get(reason, []), (reason, report["skipped"])
    assert result.report.examples == 120
    example = next(e for e in result.manifest.examples if e.id == "s5")
    assert example.labels == [DIGIT_NAMES[digits[5].digit]], "a seg example's labels are the classes in its mask"


def test_manifest_records_and_the_check_proves_no_patient_in_two_splits(tmp_path: Path) -> None:
    from pml.datasets.snapshot import check_usable, patients_in_two_splits

    folder = tmp_path / "fhir"
    write_good(folder)
    result, blobs = curate(folder, tmp_path)
    manifest = result.manifest
    assert manifest.patients_in_two_splits == 0 and not patients_in_two_splits(manifest)
    # A tampered manifest (one patient moved into a second split) is refused.
    first = manifest.examples[0]
    other = next(e for e in manifest.examples if e.patient == first.patient and e.id != first.id)
    moved = other.model_copy(update={"split": "test" if other.split != "test" else "train"})
    tampered = manifest.model_copy(update={"examples": [moved if e is other else e for e in manifest.examples]})
    with pytest.raises(StepFailed, match="patients appear in two splits"):
        check_usable(tampered, "")


def test_byte_order_marks_and_patient_versions_do_not_change_what_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    write_good(folder)
    first, _ = curate(folder, tmp_path / "a")
    path = folder / "p00.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ndjson = folder / "patients.ndjson"
    newer = {"resourceType": "Patient", "id": "p01", "gender": "female", "birthDate": "1970-01-01", "meta": {"versionId": "2"}}
    older = {**newer, "gender": "male", "meta": {"versionId": "1"}}
    ndjson.write_bytes(b"\xef\xbb\xbf" + json.dumps(newer).encode() + b"\n" + json.dumps(older).encode() + b"\n")
    second, _ = curate(folder, tmp_path / "b")
    assert second.report.examples == first.report.examples == 200
    assert second.manifest.patients["p01"]["gender"] == "female", "the latest Patient version wins"
    assert "invalid JSON" not in second.report.to_json()["skipped"]


def test_a_stratified_split_of_too_little_data_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    write_good(folder, n=20, patients=20)
    model = config()
    approach = model.training_approach.model_copy(update={"split": model.training_approach.split.model_copy(update={"strategy": "stratified"})})
    model = model.model_copy(update={"training_approach": approach})
    with pytest.raises(StepFailed, match="stratified split needs more examples of each label"):
        curate_snapshot({"type": "folder", "path": str(folder)}, model, BlobStore(tmp_path / "blobs"), Settings(home=tmp_path / "h"))


def test_transaction_bundles_with_urn_uuid_references_are_resolved(tmp_path: Path) -> None:
    """Synthea-style: entries carry fullUrl urn:uuid:…, and references use those urns."""
    folder = tmp_path / "fhir"
    write_good(folder, n=120, patients=12)
    plain, _ = curate(folder, tmp_path / "a")
    urn = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        data["type"] = "transaction"
        for entry in data["entry"]:
            resource = entry["resource"]
            key = f"{resource['resourceType']}/{resource['id']}"
            urn[key] = entry["fullUrl"] = f"urn:uuid:{abs(hash(key)):032x}"
            entry["request"] = {"method": "PUT", "url": key}
        for entry in data["entry"]:
            resource = entry["resource"]
            if "subject" in resource:
                resource["subject"]["reference"] = urn[resource["subject"]["reference"]]
            for ref in resource.get("derivedFrom", []):
                ref["reference"] = urn[ref["reference"]]
        path.write_text(json.dumps(data))
    resolved, _ = curate(folder, tmp_path / "b")
    assert resolved.report.examples == 120, resolved.report.to_json()["skipped"]
    assert resolved.manifest.snapshot_id() == plain.manifest.snapshot_id()


def test_record_files_linked_from_outside_the_source_are_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "fhir"
    write_good(folder)
    elsewhere = tmp_path / "other-account"
    write_good(elsewhere, n=40, patients=4)
    theirs = json.loads((elsewhere / "p00.json").read_text())
    for entry in theirs["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] != "Patient":
            resource["id"] = "x-" + resource["id"]
        for ref in resource.get("derivedFrom", []):
            ref["reference"] = ref["reference"].replace("DocumentReference/", "DocumentReference/x-")
    (elsewhere / "theirs.json").write_text(json.dumps(theirs))
    os.symlink(elsewhere / "theirs.json", folder / "linked.json")
    result, _ = curate(folder, tmp_path)
    assert result.report.examples == 200, "a symlinked file from outside must not add records"
