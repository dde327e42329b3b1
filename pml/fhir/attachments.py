"""Attachment bytes: inline base64, or a URL confined to the source folder.

A path from a record is never trusted: it must resolve (symlinks included) under the source
root, so a record cannot read files outside the account's data.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

IMAGE_TYPES = {"image/png", "image/jpeg"}


class AttachmentError(ValueError):
    """The attachment cannot be used; the message is the reason for the report."""


def confined_path(root: Path, url: str) -> Path:
    """The file a relative (or ``file:``) URL names, if it lies under ``root``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise AttachmentError(f"attachment URL scheme {parsed.scheme!r} is not allowed")
    raw = unquote(parsed.path)
    candidate = Path(raw) if Path(raw).is_absolute() else root / raw
    resolved = candidate.resolve()
    root_resolved = root.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise AttachmentError("attachment URL points outside the source folder")
    return resolved


def fetch_http(url: str, allowed_hosts: frozenset[str], max_bytes: int) -> bytes:
    """Download an http(s) attachment from a host on the account's allow-list, size-capped."""
    host = (urlparse(url).hostname or "").lower()
    if host not in allowed_hosts:
        raise AttachmentError(f"attachment host {host or '(none)'!r} is not on the account's allow-list")
    try:
        with httpx.stream("GET", url, timeout=30.0, follow_redirects=False) as response:
            if response.status_code != 200:
                raise AttachmentError(f"attachment URL answered HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise AttachmentError("attachment file is larger than the limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise AttachmentError(f"attachment URL could not be fetched ({type(exc).__name__})") from None


def attachment_bytes(
    attachment: dict[str, Any], root: Path | None, max_bytes: int, allowed_hosts: frozenset[str] = frozenset()
) -> tuple[bytes, str]:
    """The attachment's bytes and content type; AttachmentError says why it cannot be used.

    Relative and ``file:`` URLs stay under ``root``; http(s) URLs only reach allowed hosts.
    """
    content_type = str(attachment.get("contentType") or "").split(";")[0].strip().lower()
    if content_type not in IMAGE_TYPES:
        raise AttachmentError(f"content type {content_type or '(none)'!r} is not image/png or image/jpeg")
    if attachment.get("data"):
        data = attachment["data"]
        if not isinstance(data, str) or len(data) > max_bytes * 4 // 3 + 4:
            raise AttachmentError("inline image is larger than the limit")
        try:
            return base64.b64decode(data, validate=True), content_type
        except (binascii.Error, ValueError):
            raise AttachmentError("inline data is not valid base64") from None
    url = attachment.get("url")
    if not isinstance(url, str) or not url:
        raise AttachmentError("attachment has neither data nor url")
    if urlparse(url).scheme in ("http", "https"):
        return fetch_http(url, allowed_hosts, max_bytes), content_type
    if root is None:
        raise AttachmentError("this source allows no attachment URLs")
    path = confined_path(root, url)
    if not path.is_file():
        raise AttachmentError("attachment file does not exist")
    if path.stat().st_size > max_bytes:
        raise AttachmentError("attachment file is larger than the limit")
    return path.read_bytes(), content_type
