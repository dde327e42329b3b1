"""The FHIR-server source: search with paging and includes, Bulk Data $export, retries, tokens.

Runs against tests/fhir_server.py (see its docstring for why not a real FHIR server).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pml.blobs import BlobStore
from pml.curation import BlobIntake, curate_snapshot
from pml.errors import StepFailed
from pml.demo_data import DEMO_SYSTEM, demo_digits, png_bytes
from pml.fhir.bundles import ExampleSpec, PatientSpec, example_resources, patient_resource
from pml.fhir.records import collect_records
from pml.fhir.report import CurationReport
from pml.fhir.sources import FolderSource, ServerSource
from pml.settings import Settings
from tests.fhir_server import FhirTestServer
from tests.test_curation import CODE, T0, config, write_good


def resources_of(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.json")):
        out += [e["resource"] for e in json.loads(path.read_text())["entry"]]
    return out


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("fhir")
    write_good(folder, n=120, patients=12)
    return resources_of(folder)


def curate_from(server: FhirTestServer, tmp_path: Path, **source: object):  # type: ignore[no-untyped-def]
    settings = Settings(home=tmp_path / "home")
    spec = {"type": "server", "baseUrl": server.base_url, "token": server.token, "pageSize": 25, **source}
    return curate_snapshot(spec, config(), BlobStore(tmp_path / "blobs"), settings)


def test_search_follows_pages_and_includes_and_matches_the_folder(resources: list[dict], tmp_path: Path) -> None:
    with FhirTestServer(resources) as server:
        result = curate_from(server, tmp_path)
    assert result.report.examples == 120
    pages = [r for r in server.requests if r.startswith("GET /fhir/DocumentReference")]
    assert len(pages) == 5, pages  # 120 matches, 25 a page
    assert any("_offset=100" in r for r in pages)
    assert any("_revinclude=Observation%3Aderived-from" in r or "_revinclude=Observation:derived-from" in r for r in pages)
    # The same records from a folder give the same snapshot id.
    folder = tmp_path / "same"
    write_good(folder, n=120, patients=12)
    from_folder = curate_snapshot({"type": "folder", "path": str(folder)}, config(), BlobStore(tmp_path / "b2"),
                                  Settings(home=tmp_path / "h2"))
    assert from_folder.manifest.snapshot_id() == result.manifest.snapshot_id()


def test_bulk_export_polls_and_streams_ndjson(resources: list[dict], tmp_path: Path) -> None:
    with FhirTestServer(resources) as server:
        result = curate_from(server, tmp_path, mode="bulk")
    assert result.report.examples == 120
    assert server.export_polls == 3, "a 202 status must be polled again until 200"
    assert any(r.startswith("GET /fhir/export-files/Observation.ndjson") for r in server.requests)
    assert any(r.startswith("DELETE /fhir/export-status/1") for r in server.requests)


def test_429_and_503_are_retried(resources: list[dict], tmp_path: Path) -> None:
    with FhirTestServer(resources, flaky=3) as server:
        result = curate_from(server, tmp_path)
    assert result.report.examples == 120


def test_a_server_that_keeps_failing_fails_the_step_with_the_status(resources: list[dict]) -> None:
    with FhirTestServer(resources, flaky=100) as server:
        source = ServerSource(server.base_url, [CODE], token=server.token, backoff_s=0.0)
        with pytest.raises(StepFailed, match=r"HTTP (429|503) .* after 6 tries"):
            list(source.resources(CurationReport()))


def test_a_wrong_token_is_reported_as_refused(resources: list[dict], tmp_path: Path) -> None:
    with FhirTestServer(resources) as server:
        server.token = "other"
        with pytest.raises(StepFailed, match="refused the account's token"):
            curate_from(server, tmp_path, token="secret-token")


def test_next_links_to_another_host_are_not_followed(resources: list[dict], tmp_path: Path) -> None:
    with FhirTestServer(resources) as server:
        server.foreign_next = True
        with pytest.raises(StepFailed, match="not its own"):
            curate_from(server, tmp_path)


def test_r5_document_reference_is_read(tmp_path: Path) -> None:
    """R5 moved context.period to period and made context a list of references."""
    resources = []
    digits = demo_digits()[:60]
    for k in range(6):
        resources.append(patient_resource(PatientSpec(f"p{k}", "male", "1980")))
    for d in digits:
        spec = ExampleSpec(id=f"r5-{d.index}", patient_id=f"p{d.index // 10}", time=T0, image=png_bytes(d),
                           code_system=DEMO_SYSTEM, code=CODE, labels=["zero" if d.digit % 2 == 0 else "one"])
        doc, obs = example_resources(spec)
        doc.pop("context")
        doc["period"] = {"start": f"2024-0{1 + d.index // 10}-01T00:00:00Z"}
        doc["context"] = [{"reference": "Encounter/e1"}]
        doc.pop("date")
        resources += [doc, obs]
    folder = tmp_path / "r5"
    folder.mkdir()
    (folder / "r5.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                                "entry": [{"resource": r} for r in resources]}))
    report = CurationReport()
    intake = BlobIntake(BlobStore(tmp_path / "blobs"), folder, Settings(home=tmp_path / "h"), frozenset())
    records = collect_records(FolderSource(folder).resources(report), [CODE], report, intake)
    intake.finish()
    assert len(records.examples) == 60, report.to_json()
    times = sorted({e.time.month for e in records.examples})
    assert times == [1, 2, 3, 4, 5, 6], "R5 period.start must give each example its time"


def test_links_that_change_scheme_or_loop_are_refused() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.scheme == "https", "the token must never travel over plain http"
        next_url = "http://fhir.example/r4/DocumentReference?page=2" if "downgrade" in str(request.url) else str(request.url)
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": [],
                                         "link": [{"relation": "next", "url": next_url}]})

    downgrade = ServerSource("https://fhir.example/r4", ["downgrade"], token="SECRET", transport=httpx.MockTransport(answer))
    with pytest.raises(StepFailed, match="not its own"):
        list(downgrade.resources(CurationReport()))
    looping = ServerSource("https://fhir.example/r4", ["x"], token="SECRET", transport=httpx.MockTransport(answer))
    with pytest.raises(StepFailed, match="loop"):
        list(looping.resources(CurationReport()))


def test_bulk_lines_split_on_newline_only(resources: list[dict], tmp_path: Path) -> None:
    """JSON strings may hold U+2028 or NEL unescaped; they do not end an NDJSON line."""
    odd = [dict(r) for r in resources]
    for r in odd:
        if r["resourceType"] == "Patient":
            r["name"] = [{"family": "Smith\u2028Jones\u0085"}]
    with FhirTestServer(odd, raw_unicode=True) as server:
        result = curate_from(server, tmp_path, mode="bulk")
    assert result.report.examples == 120, result.report.to_json()["skipped"]
