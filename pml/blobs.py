"""Content-addressed, write-once file store, one per account (images, masks, manifests, models).

A blob's name is the sha256 of its bytes; it is written once, made read-only, and verified
against its name whenever it is read, so a snapshot can never change under a run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from pml.errors import NotFound, PmlError

CHUNK = 1024 * 1024


class BlobCorrupted(PmlError):
    """A blob's bytes no longer match its name."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class BlobStore:
    """The blobs of one account, under ``<home>/accounts/<account>/blobs``."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise NotFound(f"blob {sha!r} is not a sha256")
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        sha = sha256_bytes(data)
        self.put_hashed(sha, data)
        return sha

    def put_hashed(self, sha: str, data: bytes) -> None:
        """Store bytes whose sha256 the caller already computed (e.g. in a writer thread)."""
        target = self.path(sha)
        if not target.exists():
            self._write(target, lambda handle: handle.write(data))

    def put_file(self, source: Path) -> str:
        sha = sha256_file(source)
        target = self.path(sha)
        if not target.exists():

            def copy(handle) -> None:  # type: ignore[no-untyped-def]
                with open(source, "rb") as src:
                    for chunk in iter(lambda: src.read(CHUNK), b""):
                        handle.write(chunk)

            self._write(target, copy)
        return sha

    def _write(self, target: Path, write) -> None:  # type: ignore[no-untyped-def]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)  # atomic: readers never see half a blob
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, sha: str) -> bool:
        return self.path(sha).exists()

    def read(self, sha: str) -> bytes:
        path = self.path(sha)
        if not path.exists():
            raise NotFound(f"blob {sha} is missing")
        data = path.read_bytes()
        if sha256_bytes(data) != sha:
            raise BlobCorrupted(f"blob {sha} does not match its hash")
        return data

    def verified_path(self, sha: str) -> Path:
        """The blob's path after checking its content (for large files read by others)."""
        path = self.path(sha)
        if not path.exists():
            raise NotFound(f"blob {sha} is missing")
        if sha256_file(path) != sha:
            raise BlobCorrupted(f"blob {sha} does not match its hash")
        return path
