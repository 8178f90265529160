"""The cffi-built native module: hashing and zero-page detection."""

from __future__ import annotations

import os

from ksmtrace import native

PAGE = native.PAGE


def test_identical_pages_hash_equal_and_distinct_differ() -> None:
    a = os.urandom(PAGE)
    b = bytearray(a)
    b[PAGE - 1] ^= 1
    h = native.hash_pages(a + a + bytes(b))
    assert h[0] == h[1] != h[2]


def test_zero_pages_counted() -> None:
    data = bytearray(PAGE * 4)
    data[PAGE * 2 + PAGE - 1] = 1  # last byte only: the tail compare must catch it
    assert native.count_zero_pages(data) == 3
    data[0] = 1
    assert native.count_zero_pages(data) == 2


def test_version() -> None:
    assert native.version().startswith("ksmnative")
