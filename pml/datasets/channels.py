"""Write a snapshot's splits as training channels, the layout the container contract names.

Each channel folder holds ``dataset.json`` (problem type and label index map),
``manifest.jsonl`` (one example per line) and the image and mask files, hard-linked from
the read-only blob store where the filesystem allows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pml.blobs import BlobStore
from pml.datasets.snapshot import ManifestExample, SnapshotManifest

EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg"}


def _link(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_channel(blobs: BlobStore, manifest: SnapshotManifest, examples: list[ManifestExample], folder: Path) -> Path:
    """Lay out ``examples`` (a split or a fold) under ``folder``; re-writing is harmless."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    lines = []
    for example in examples:
        image_name = f"images/{example.image}{EXTENSIONS[example.image_type]}"
        _link(blobs.verified_path(example.image), folder / image_name)
        mask_name = None
        if example.mask:
            mask_name = f"masks/{example.mask}.png"
            _link(blobs.verified_path(example.mask), folder / mask_name)
        lines.append(json.dumps({"id": example.id, "image": image_name, "labels": example.labels, "mask": mask_name}))
    dataset = {
        "problemType": "imgSeg" if manifest.problem_type == "imgSeg" else "imgClassification",
        "multiLabel": manifest.multi_label,
        "labels": [{"name": name, "index": index} for name, index in manifest.labels.items()],
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return folder
