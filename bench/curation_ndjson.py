"""Curation throughput and memory on bulk-export NDJSON, against plain orjson parsing.

Writes a realistic mix of FHIR resources (Patients, Encounters, vital-sign and lab
Observations, Conditions, MedicationRequests, clinical-note DocumentReferences) with a small
share of image examples matching the filter (a DocumentReference with a real 8x8 digit PNG
and its label Observation), then measures:

- ``orjson``: reading the file and ``orjson.loads`` of every line, nothing else;
- ``pml``: ``curate_snapshot`` on the same file (parse, filter, validate what matches,
  decode and store images, build the snapshot);
- peak resident memory of ``pml`` at two input sizes, each in its own process.

Usage: python bench/curation_ndjson.py [--sizes 100000 1000000] [--match-share 0.002] [--repeat 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from pml.demo_data import DEMO_SYSTEM, DIGIT_NAMES, demo_digits, png_bytes

CODE = "digit-image"


def _resources(n: int, match_share: float, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    digits = demo_digits()
    images = [base64.b64encode(png_bytes(d)).decode() for d in digits]
    patients = max(100, n // 100)
    for p in range(patients):
        yield {"resourceType": "Patient", "id": f"pt{p}", "gender": rng.choice(["male", "female"]),
               "birthDate": f"{rng.randint(1930, 2010)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
               "name": [{"family": "Example", "given": ["Pat"]}], "meta": {"versionId": "1"}}
    produced = patients
    example = 0
    while produced < n:
        produced += 1
        p = rng.randrange(patients)
        when = f"20{rng.randint(15, 24)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:00:00Z"
        roll = rng.random()
        if roll < match_share / 2:
            d = digits[example % len(digits)]
            rid = f"ex{example}"
            example += 1
            yield {"resourceType": "DocumentReference", "id": rid, "status": "current",
                   "type": {"coding": [{"system": DEMO_SYSTEM, "code": CODE}]},
                   "subject": {"reference": f"Patient/pt{p}"}, "date": when,
                   "content": [{"attachment": {"contentType": "image/png", "data": images[d.index]}}]}
            produced += 1
            yield {"resourceType": "Observation", "id": f"{rid}-label", "status": "final",
                   "code": {"coding": [{"system": "urn:pml:label", "code": "label"}]},
                   "derivedFrom": [{"reference": f"DocumentReference/{rid}"}],
                   "valueCodeableConcept": {"coding": [{"code": DIGIT_NAMES[d.digit]}]}}
        elif roll < 0.55:
            yield {"resourceType": "Observation", "id": f"o{produced}", "status": "final",
                   "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                   "code": {"coding": [{"system": "http://loinc.org", "code": rng.choice(["8867-4", "8310-5", "9279-1"])}]},
                   "subject": {"reference": f"Patient/pt{p}"}, "effectiveDateTime": when,
                   "valueQuantity": {"value": round(rng.uniform(30, 180), 1), "unit": "/min"}}
        elif roll < 0.75:
            yield {"resourceType": "Observation", "id": f"o{produced}", "status": "final",
                   "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
                   "code": {"coding": [{"system": "http://loinc.org", "code": rng.choice(["2345-7", "718-7", "2160-0"])}]},
                   "subject": {"reference": f"Patient/pt{p}"}, "effectiveDateTime": when,
                   "valueQuantity": {"value": round(rng.uniform(1, 200), 2), "unit": "mg/dL"},
                   "referenceRange": [{"low": {"value": 70}, "high": {"value": 110}}]}
        elif roll < 0.85:
            yield {"resourceType": "Encounter", "id": f"e{produced}", "status": "finished",
                   "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                   "subject": {"reference": f"Patient/pt{p}"}, "period": {"start": when, "end": when}}
        elif roll < 0.92:
            yield {"resourceType": "Condition", "id": f"c{produced}",
                   "code": {"coding": [{"system": "http://snomed.info/sct", "code": str(rng.randint(10**7, 10**8))}]},
                   "subject": {"reference": f"Patient/pt{p}"}, "onsetDateTime": when}
        elif roll < 0.97:
            yield {"resourceType": "MedicationRequest", "id": f"m{produced}", "status": "active", "intent": "order",
                   "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": str(rng.randint(1000, 99999))}]},
                   "subject": {"reference": f"Patient/pt{p}"}, "authoredOn": when}
        else:
            yield {"resourceType": "DocumentReference", "id": f"note{produced}", "status": "current",
                   "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
                   "subject": {"reference": f"Patient/pt{p}"}, "date": when,
                   "content": [{"attachment": {"contentType": "text/plain", "data": "UHJvZ3Jlc3Mgbm90ZQ=="}}]}


def write_ndjson(path: Path, n: int, match_share: float) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for r in _resources(n, match_share):
            handle.write(orjson.dumps(r) + b"\n")


def run_orjson(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as handle:
        for line in handle:
            orjson.loads(line)
    return time.perf_counter() - start


def run_pml(folder: Path, home: Path) -> dict[str, float]:
    """Curate in this process; returns seconds and the peak RSS (MiB)."""
    from pml.blobs import BlobStore
    from pml.curation import curate_snapshot
    from pml.demo import digits_config
    from pml.schemas.config import assign_labels, parse_model_config
    from pml.settings import Settings

    config = digits_config("imgClf")
    config["problemDefinition"]["trainingDataFilter"]["codes"] = [f"{DEMO_SYSTEM}|{CODE}"]
    model = assign_labels(parse_model_config(config))
    start = time.perf_counter()
    result = curate_snapshot({"type": "folder", "path": str(folder)}, model, BlobStore(home / "blobs"), Settings(home=home))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples": result.report.examples, "read": result.report.resources_read,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--match-share", type=float, default=0.002)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pml-bench-curation")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # measure one size in a fresh process, so peak memory is its own
        print(json.dumps(run_pml(args.child, Path(tempfile.mkdtemp()))))
        return
    results = []
    for n in args.sizes:
        folder = args.work / f"n{n}"
        write_ndjson(folder / "export.ndjson", n, args.match_share)
        size_mb = (folder / "export.ndjson").stat().st_size / 2**20
        # Best of three of each: this machine's timings vary by a third from run to run.
        baseline = min(run_orjson(folder / "export.ndjson") for _ in range(args.repeat))
        runs = []
        for _ in range(args.repeat):
            child = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True, check=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        pml = min(runs, key=lambda r: r["seconds"])
        pml["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        results.append({
            "resources": n, "file_mib": round(size_mb, 1), "examples": pml["examples"],
            "orjson_s": round(baseline, 2), "orjson_per_s": round(n / baseline),
            "pml_s": round(pml["seconds"], 2), "pml_per_s": round(n / pml["seconds"]),
            "pml_vs_orjson": round(baseline / pml["seconds"], 3), "pml_peak_rss_mib": round(pml["peak_rss_mib"]),
        })
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
