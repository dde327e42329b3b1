"""A folder of FHIR JSON (Bundles or single resources) and bulk-export NDJSON, nested, gzipped or not."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import IO, Any, Iterator

from pml.fhir.report import CurationReport
from pml.fhir.sources.base import RawResource

SUFFIXES = (".json", ".json.gz", ".ndjson", ".ndjson.gz")


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _unpack(resource: Any, origin: str, report: CurationReport) -> Iterator[RawResource]:
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        report.skip(origin, "not a FHIR resource (no resourceType)")
        return
    if resource["resourceType"] != "Bundle":
        yield RawResource(resource, origin)
        return
    for i, entry in enumerate(resource.get("entry") or []):
        inner = entry.get("resource") if isinstance(entry, dict) else None
        if inner is None:
            report.skip(f"{origin}#entry[{i}]", "bundle entry without a resource")
            continue
        yield from _unpack(inner, f"{origin}#entry[{i}]", report)


class FolderSource:
    def __init__(self, root: Path):
        self.root = root.resolve()

    def files(self) -> list[Path]:
        found = [p for p in self.root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)]
        return sorted(found)

    def resources(self, report: CurationReport) -> Iterator[RawResource]:
        for path in self.files():
            name = str(path.relative_to(self.root))
            try:
                if ".ndjson" in path.name:
                    yield from self._ndjson(path, name, report)
                else:
                    with _open(path) as handle:
                        data = json.load(handle)
                    yield from _unpack(data, name, report)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                report.skip(name, f"unreadable file ({type(exc).__name__})")
            except (json.JSONDecodeError, UnicodeDecodeError):
                report.skip(name, "invalid JSON")

    def _ndjson(self, path: Path, name: str, report: CurationReport) -> Iterator[RawResource]:
        with _open(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    report.skip(f"{name}:{number}", "invalid JSON line")
                    continue
                yield from _unpack(data, f"{name}:{number}", report)
