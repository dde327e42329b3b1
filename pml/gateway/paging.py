"""Paging of List calls with page_size / page_token, shared by the gRPC and HTTP APIs.

Tokens are opaque to clients; only a token this service issued is accepted.
"""

from __future__ import annotations

import base64
from typing import Callable, TypeVar

from pml.errors import InvalidArgument

DEFAULT_PAGE = 50
MAX_PAGE = 500

T = TypeVar("T")


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(str(offset).encode()).decode()


def _offset(page_token: str) -> int:
    """The offset a token stands for; only a token this service issued (its exact spelling) is
    accepted, so garbage or a hand-made negative offset is the client's error, not a page."""
    if not page_token:
        return 0
    try:
        text = base64.urlsafe_b64decode(page_token.encode()).decode("ascii")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        text = ""
    if not text.isdigit() or _token(int(text)) != page_token:
        raise InvalidArgument([("page_token", "not a token this service issued")])
    return int(text)


def _size(page_size: int) -> int:
    """A page_size of 0 is the default, one above the maximum is the maximum (as Google's API
    design guide asks); a negative one is the client's error."""
    if page_size < 0:
        raise InvalidArgument([("page_size", f"must be 0 (the default, {DEFAULT_PAGE}) or more, not {page_size}")])
    return min(page_size or DEFAULT_PAGE, MAX_PAGE)


def page(items: list[T], page_size: int, page_token: str) -> tuple[list[T], str]:
    """Offset paging, for lists oldest first (new items land after every page already read);
    the token is opaque to clients."""
    size = _size(page_size)
    start = _offset(page_token)
    chunk = items[start : start + size]
    end = start + len(chunk)
    return chunk, _token(end) if end < len(items) else ""


def newest_first_page(items: list[T], key: Callable[[T], int], page_size: int,
                       page_token: str) -> tuple[list[T], str]:
    """Keyset paging, for lists newest first (audit entries, deliveries): ``key`` falls along
    the list and the token is the key of the last item sent, so items written between two
    pages never shift the next one (no repeats, no gaps)."""
    size = _size(page_size)
    if page_token:
        below = _offset(page_token)
        items = [item for item in items if key(item) < below]
    chunk = items[:size]
    return chunk, _token(key(chunk[-1])) if len(items) > size else ""
