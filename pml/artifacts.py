"""Model artifacts: a trial's model folder as a reproducible ``model.tar.gz`` in the blob store.

The same folder always packs to the same bytes (sorted names, zeroed times), so its sha256
identifies the model; edge users download it and check that hash.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

from pml.blobs import BlobStore
from pml.errors import StepFailed


def pack_model(model_dir: Path) -> bytes:
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if not files:
        raise StepFailed("the best trial wrote no files to its model folder (/opt/ml/model)")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(
        fileobj=gz, mode="w", format=tarfile.PAX_FORMAT
    ) as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(model_dir)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def store_model(blobs: BlobStore, model_dir: Path) -> str:
    return blobs.put(pack_model(model_dir))


def unpack_model(blobs: BlobStore, sha: str, models_root: Path) -> Path:
    """The artifact's files in ``models_root/<sha>`` (unpacked once, then reused)."""
    target = models_root / sha
    if (target / ".complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(blobs.verified_path(sha), mode="r:gz") as tar:
        tar.extractall(target, filter="data")  # "data" refuses absolute paths and ".." members
    (target / ".complete").touch()
    return target
