"""The image registry: which runtime runs an image URI, and from where.

A URI registered with a local folder runs on the process runtime (the folder holds the
image's ``train`` and ``serve`` entry points); a URI registered as a Docker image runs on the
docker runtime from a reference in the local engine. The registry entry picks the runtime,
never the URI's shape. An unknown URI fails the run with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy.orm import Session

from pml.errors import ImageNotFound, InvalidArgument
from pml.store.tables import Image

ENTRY_POINTS = ("train", "serve")
# `pml images add URI docker://REFERENCE`: run URI from REFERENCE in the Docker engine.
DOCKER_SCHEME = "docker://"


@dataclass(frozen=True)
class ResolvedImage:
    uri: str
    kind: str  # "process" or "docker"
    path: Path | None
    reference: str | None = None
    """Docker: the image reference in the engine (``name:tag`` or an id); None for process images."""

    def entry_point(self, name: str) -> Path:
        if self.path is None:
            raise ImageNotFound(f"image {self.uri!r} has no local folder")
        entry = self.path / name
        if not entry.is_file():
            raise ImageNotFound(f"image {self.uri!r} has no {name!r} entry point in its folder")
        return entry


def add_image(session: Session, uri: str, path: Path) -> Image:
    """Register (or re-point) a URI to a local folder holding ``train`` and/or ``serve``."""
    if not uri.strip():
        raise InvalidArgument([("uri", "must not be empty")])
    folder = path.resolve()
    if not folder.is_dir():
        raise InvalidArgument([("path", f"{path} is not a folder")])
    if not any((folder / name).is_file() for name in ENTRY_POINTS):
        raise InvalidArgument([("path", f"{path} holds neither a 'train' nor a 'serve' entry point")])
    return _upsert(session, uri, "process", str(folder))


def add_docker_image(
    session: Session, uri: str, reference: str | None = None,
    check: Callable[[str], None] | None = None,
) -> Image:
    """Register (or re-point) a URI to a Docker image; the docker runtime then runs it.

    ``reference`` is the image in the engine (default: the URI itself, as pulled or tagged).
    ``check`` (e.g. ``pml.runtimes.docker.check_image``) raises when the engine is unreachable
    or lacks the image. It is optional because on a Ray cluster the images live on the GPU
    nodes, not necessarily where the image is registered.
    """
    if not uri.strip():
        raise InvalidArgument([("uri", "must not be empty")])
    reference = (reference or uri).strip()
    if not reference or any(c.isspace() for c in reference):
        raise InvalidArgument([("reference", f"{reference!r} is not a Docker image reference")])
    if check is not None:
        check(reference)
    return _upsert(session, uri, "docker", reference)


def _upsert(session: Session, uri: str, kind: str, path: str) -> Image:
    image = session.get(Image, uri)
    if image is None:
        image = Image(uri=uri, kind=kind, path=path)
        session.add(image)
    else:
        image.kind, image.path = kind, path
    session.flush()
    return image


def resolve_image(session: Session, uri: str) -> ResolvedImage:
    """The registry entry of a URI.

    A Docker image is not looked up in an engine here: the engine that runs a trial may be on
    another host (a Ray GPU node); the docker runtime says clearly when its engine lacks it.
    """
    image = session.get(Image, uri)
    if image is None:
        raise ImageNotFound(
            f"image {uri!r} is not in the image registry; register it with 'pml images add {uri} PATH' "
            f"(a folder) or 'pml images add {uri} --docker' (a Docker image)"
        )
    if image.kind == "docker":
        return ResolvedImage(uri=image.uri, kind="docker", path=None, reference=image.path or image.uri)
    path = Path(image.path) if image.path else None
    if path is not None and not path.is_dir():
        raise ImageNotFound(f"image {uri!r} points at {path}, which is not a folder any more")
    return ResolvedImage(uri=image.uri, kind=image.kind, path=path)


def list_images(session: Session) -> list[Image]:
    return list(session.query(Image).order_by(Image.uri))
