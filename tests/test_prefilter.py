"""The NDJSON prefilter skips only lines that cannot matter, and the block scan agrees with it."""

from __future__ import annotations

import json
import random

import pytest

from pml.fhir.prefilter import ChunkPrefilter, LinePrefilter

CODES = ["urn:pml:demo|digit-image", "http://x.org/a/b|sl/ash"]


def sample_lines(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    shapes = [
        {"resourceType": "Observation", "id": "o", "code": {"coding": [{"code": "8867-4"}]}},
        {"resourceType": "Observation", "id": "l", "code": {"coding": [{"system": "urn:pml:label", "code": "label"}]}},
        {"resourceType": "Patient", "id": "p"},
        {"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/p"}},
        {"resourceType": "Encounter", "contained": [{"resourceType": "Patient", "id": "c"}]},
        {"resourceType": "DocumentReference", "id": "d", "type": {"coding": [{"code": "digit-image"}]}},
        {"resourceType": "DocumentReference", "id": "n", "type": {"coding": [{"code": "11506-3"}]}},
        {"resourceType": "Media", "id": "m", "type": {"coding": [{"code": "sl/ash"}]}},
        {"resourceType": "Bundle", "entry": []},
        {"id": "late", "resourceType": "Observation", "code": {"coding": [{"system": "urn:pml:label"}]}},
        {"id": "late2", "resourceType": "Condition"},
        {"resourceType": "Observation", "note": "caf\u00e9"},
    ]
    lines = []
    for _ in range(300):
        shape = rng.choice(shapes)
        text = json.dumps(shape, ensure_ascii=rng.random() < 0.5, separators=(",", ":") if rng.random() < 0.8 else None)
        if rng.random() < 0.1:
            text = text.replace("/", "\\/")
        lines.append(text.encode())
    lines += [b"", b"{broken", b'{"resourceType":"Observation"', b'{"no": "resourceType"}']
    rng.shuffle(lines)
    return lines


def test_line_filter_parses_every_line_that_can_matter() -> None:
    keep = LinePrefilter(CODES)
    assert not keep(b'{"resourceType":"Observation","code":{"coding":[{"code":"8867-4"}]}}')
    assert not keep(b'{"resourceType":"Encounter","contained":[{"resourceType":"Patient"}]}')
    for line in (
        b'{"resourceType":"Patient","id":"p"}',
        b'{"resourceType":"Observation","code":{"coding":[{"system":"urn:pml:label"}]}}',
        b'{"resourceType":"DocumentReference","type":{"coding":[{"code":"digit-image"}]}}',
        b'{"resourceType":"Media","type":{"coding":[{"code":"sl\\/ash"}]}}',
        b'{"id":"x","resourceType":"Observation","code":{"coding":[{"system":"urn:pml:label"}]}}',
        b'{"resourceType":"Observation","note":"caf\\u00e9"}',
        b'{"no": "resourceType"}',
        b"{broken",
    ):
        assert keep(line), line


@pytest.mark.parametrize("seed", range(5))
def test_block_scan_chooses_exactly_the_lines_the_line_filter_chooses(seed: int) -> None:
    lines = sample_lines(seed)
    block = b"\n".join(lines) + b"\n"
    line_filter = LinePrefilter(CODES)
    offsets, position = [], 0
    for line in lines:
        offsets.append(position)
        position += len(line) + 1
    expected = [o for o, line in zip(offsets, lines) if line_filter(line)]
    assert ChunkPrefilter(line_filter).candidates(block) == expected


def test_codes_with_quotes_or_backslashes_are_found_as_json_writes_them() -> None:
    keep = LinePrefilter(['urn:x|a"b\\c'])
    line = json.dumps({"resourceType": "DocumentReference", "type": {"coding": [{"code": 'a"b\\c'}]}}).encode()
    assert keep(line)
