"""The interface every FHIR source implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from pml.fhir.report import CurationReport


@dataclass(frozen=True)
class RawResource:
    resource: dict[str, Any]
    origin: str
    """Where it came from (file and entry or line), for the curation report."""


class FhirSource(Protocol):
    root: Path | None
    """Folder that relative attachment URLs resolve under (None: no local files allowed)."""

    def resources(self, report: CurationReport) -> Iterator[RawResource]:
        """Every resource, with Bundles unpacked; unreadable records go to the report."""
        ...
