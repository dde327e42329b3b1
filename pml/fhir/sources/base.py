"""The interface every FHIR source implements, and the parsing all sources share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Protocol

import orjson

from pml.fhir.prefilter import ChunkPrefilter, LinePrefilter
from pml.fhir.report import CurationReport



@dataclass(frozen=True)
class RawResource:
    resource: dict[str, Any]
    origin: str
    """Where it came from (file and entry or line), for the curation report."""
    full_url: str | None = None
    """The Bundle entry's fullUrl (e.g. ``urn:uuid:…``), which references may use."""


class FhirSource(Protocol):
    root: Path | None
    """Folder that relative attachment URLs resolve under (None: no local files allowed)."""

    def resources(self, report: CurationReport, wanted: Callable[[bytes], bool] | None = None) -> Iterator[RawResource]:
        """Every resource, with Bundles unpacked; unreadable records go to the report.

        ``wanted`` lets NDJSON lines that cannot matter be skipped unparsed.
        """
        ...


def unpack(resource: Any, origin: str, report: CurationReport, full_url: str | None = None) -> Iterator[RawResource]:
    """A resource, or every resource of a Bundle of any type (nested Bundles too)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        report.skip(origin, "not a FHIR resource (no resourceType)")
        return
    if resource["resourceType"] != "Bundle":
        yield RawResource(resource, origin, full_url)
        return
    for i, entry in enumerate(resource.get("entry") or []):
        inner = entry.get("resource") if isinstance(entry, dict) else None
        if inner is None:
            report.skip(f"{origin}#entry[{i}]", "bundle entry without a resource")
            continue
        url = entry.get("fullUrl")
        yield from unpack(inner, f"{origin}#entry[{i}]", report, url if isinstance(url, str) else None)


BOM = b"\xef\xbb\xbf"


def _line_resources(line: bytes, origin: str, report: CurationReport) -> Iterator[RawResource]:
    """The resources of one NDJSON line; a line that is not JSON is reported."""
    if line.startswith(BOM):  # some Windows tools start a file with one
        line = line[len(BOM) :]
    if not line.strip():
        return
    try:
        data = orjson.loads(line)
    except (orjson.JSONDecodeError, RecursionError):
        report.skip(origin, "invalid JSON line")
        return
    yield from unpack(data, origin, report)


def ndjson_resources(
    lines: Iterable[bytes], name: str, report: CurationReport, wanted: Callable[[bytes], bool] | None = None
) -> Iterator[RawResource]:
    """Resources of an NDJSON stream (bulk-export format), one per line; bad lines reported.

    ``wanted`` may skip lines unparsed (see ``pml.fhir.prefilter``); they still count as read.
    """
    skipped = 0
    try:
        for number, line in enumerate(lines, start=1):
            if wanted is not None and not wanted(line):
                skipped += 1
                continue
            yield from _line_resources(line, f"{name}:{number}", report)
    finally:
        report.resources_read += skipped


BLOCK = 8 * 1024 * 1024  # bytes read at a time by ndjson_blocks


def ndjson_blocks(handle: IO[bytes], name: str, report: CurationReport, prefilter: LinePrefilter) -> Iterator[RawResource]:
    """Like ``ndjson_resources`` for a file, deciding a block of lines at a time.

    Most lines of a bulk export never reach Python: the block is searched for the few lines
    that can matter (see ``ChunkPrefilter``) and only those are parsed.
    """
    chunks = ChunkPrefilter(prefilter)
    carry = b""
    line_base = 0  # lines before the current block
    skipped = 0
    try:
        while True:
            data = handle.read(BLOCK)
            if line_base == 0 and not carry and data.startswith(BOM):
                data = data[len(BOM) :]
            if not data:
                block, carry = carry, b""
                if block and not block.endswith(b"\n"):
                    block += b"\n"
            else:
                cut = data.rfind(b"\n")
                if cut == -1:
                    carry += data
                    continue
                block, carry = carry + data[: cut + 1], data[cut + 1 :]
            if not block:
                break
            starts = chunks.candidates(block)
            lines = block.count(b"\n")
            skipped += lines - len(starts)
            counted, previous = line_base, 0
            for start in starts:
                counted += block.count(b"\n", previous, start)
                previous = start
                yield from _line_resources(block[start : block.find(b"\n", start)], f"{name}:{counted + 1}", report)
            line_base += lines
            if not data:
                break
    finally:
        report.resources_read += skipped
