"""The image registry: which runtime runs an image URI, and from where.

A URI registered with a local folder runs on the process runtime (the folder holds the
image's ``train`` and ``serve`` entry points); an unknown URI fails the run with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from pml.errors import ImageNotFound, InvalidArgument
from pml.store.tables import Image

ENTRY_POINTS = ("train", "serve")


@dataclass(frozen=True)
class ResolvedImage:
    uri: str
    kind: str  # "process"
    path: Path | None

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
    image = session.get(Image, uri)
    if image is None:
        image = Image(uri=uri, kind="process", path=str(folder))
        session.add(image)
    else:
        image.kind, image.path = "process", str(folder)
    session.flush()
    return image


def resolve_image(session: Session, uri: str) -> ResolvedImage:
    image = session.get(Image, uri)
    if image is None:
        raise ImageNotFound(
            f"image {uri!r} is not in the image registry; register it with 'pml images add {uri} PATH'"
        )
    path = Path(image.path) if image.path else None
    if path is not None and not path.is_dir():
        raise ImageNotFound(f"image {uri!r} points at {path}, which is not a folder any more")
    return ResolvedImage(uri=image.uri, kind=image.kind, path=path)


def list_images(session: Session) -> list[Image]:
    return list(session.query(Image).order_by(Image.uri))
