"""Paging without a server: offset pages for lists oldest first, keyset pages newest first."""

from __future__ import annotations

import pytest

from pml.errors import InvalidArgument
from pml.gateway.paging import newest_first_page, page


def test_newest_first_pages_do_not_shift_when_items_are_added_between_them() -> None:
    items = list(range(10, 0, -1))  # ids, newest first
    first, token = newest_first_page(items, lambda i: i, 4, "")
    assert first == [10, 9, 8, 7] and token
    grown = [12, 11] + items  # two newer items arrive before the next page is asked for
    second, token = newest_first_page(grown, lambda i: i, 4, token)
    third, last = newest_first_page(grown, lambda i: i, 4, token)
    assert (second, third, last) == ([6, 5, 4, 3], [2, 1], "")


def test_offset_pages_walk_once_and_tokens_are_checked() -> None:
    items = list(range(7))
    seen, token = [], ""
    while True:
        chunk, token = page(items, 3, token)
        seen += chunk
        if not token:
            break
    assert seen == items
    with pytest.raises(InvalidArgument) as bad:
        page(items, 3, "bm90LWEtbnVtYmVy")  # base64 of "not-a-number"
    assert bad.value.violations[0][0] == "page_token"
    with pytest.raises(InvalidArgument) as negative:
        newest_first_page(items, lambda i: i, -1, "")
    assert negative.value.violations[0][0] == "page_size"
