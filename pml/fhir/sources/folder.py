"""A folder of FHIR JSON (Bundles or single resources) and bulk-export NDJSON, nested, gzipped or not."""

from __future__ import annotations

import gzip

import orjson
from pathlib import Path
from typing import IO, Callable, Iterator

from pml.fhir.report import CurationReport
from pml.fhir.prefilter import LinePrefilter
from pml.fhir.sources.base import BOM, RawResource, ndjson_blocks, ndjson_resources, unpack

SUFFIXES = (".json", ".json.gz", ".ndjson", ".ndjson.gz")


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


class FolderSource:
    def __init__(self, root: Path):
        self.root = root.resolve()

    def files(self) -> list[Path]:
        """The record files, never one whose real path (symlinks followed) is outside the root."""
        found = []
        for path in self.root.rglob("*"):
            if not path.name.endswith(SUFFIXES) or not path.is_file():
                continue
            real = path.resolve()
            if real == self.root or self.root in real.parents:
                found.append(path)
        return sorted(found)

    def resources(self, report: CurationReport, wanted: Callable[[bytes], bool] | None = None) -> Iterator[RawResource]:
        for path in self.files():
            name = str(path.relative_to(self.root))
            try:
                if ".ndjson" in path.name:
                    with _open(path) as handle:
                        if isinstance(wanted, LinePrefilter):
                            yield from ndjson_blocks(handle, name, report, wanted)
                        else:
                            yield from ndjson_resources(handle, name, report, wanted)
                else:
                    with _open(path) as handle:
                        data = orjson.loads(handle.read().removeprefix(BOM))
                    yield from unpack(data, name, report)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                report.skip(name, f"unreadable file ({type(exc).__name__})")
            except (orjson.JSONDecodeError, UnicodeDecodeError):
                report.skip(name, "invalid JSON")
            except RecursionError:
                report.skip(name, "invalid JSON (nested too deeply)")
