"""FHIR sources: where an account's records come from. Each yields raw resources (dicts).

A source never fails a run for one bad record: it reports the record and goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pml.errors import StepFailed
from pml.fhir.sources.base import FhirSource, RawResource
from pml.fhir.sources.folder import FolderSource
from pml.fhir.sources.server import ServerSource


def open_source(config: dict[str, Any], codes: list[str]) -> FhirSource:
    """The source an account's ``fhir_source`` setting describes (see ``pml.accounts``)."""
    if config.get("type") == "folder":
        root = Path(config["path"])
        if not root.is_dir():
            raise StepFailed(f"the account's FHIR folder does not exist or is not a folder: {root}")
        return FolderSource(root)
    if config.get("type") == "server":
        return ServerSource(
            config["baseUrl"], codes, token=config.get("token"), mode=config.get("mode", "search"),
            page_size=int(config.get("pageSize", 100)),
        )
    raise StepFailed(f"unsupported FHIR source type {config.get('type')!r}")


__all__ = ["FhirSource", "RawResource", "FolderSource", "ServerSource", "open_source"]
