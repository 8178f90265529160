"""BTF offset resolution on a synthetic type list (nested anonymous members)."""

from __future__ import annotations

import pytest

from ksmtrace.kernel.btf import Btf

TYPES = [
    {"id": 1, "kind": "INT", "name": "long", "size": 8},
    {
        "id": 2,
        "kind": "STRUCT",
        "name": "(anon)",
        "size": 16,
        "members": [
            {"name": "a", "type_id": 1, "bits_offset": 0},
            {"name": "b", "type_id": 1, "bits_offset": 64},
        ],
    },
    {
        "id": 3,
        "kind": "STRUCT",
        "name": "outer",
        "size": 40,
        "members": [
            {"name": "x", "type_id": 1, "bits_offset": 0},
            {"name": "(anon)", "type_id": 2, "bits_offset": 128},
            {"name": "inner", "type_id": 5, "bits_offset": 256},
        ],
    },
    {
        "id": 4,
        "kind": "STRUCT",
        "name": "pair",
        "size": 16,
        "members": [
            {"name": "lo", "type_id": 1, "bits_offset": 0},
            {"name": "hi", "type_id": 1, "bits_offset": 64},
        ],
    },
    {"id": 5, "kind": "TYPEDEF", "name": "pair_t", "type_id": 4},
]


def test_offsets_through_anonymous_and_typedef() -> None:
    b = Btf(TYPES)
    assert b.offset("outer", "x") == 0
    assert b.offset("outer", "b") == 24
    assert b.offset("outer", "inner.hi") == 40
    assert b.size("outer") == 40
    assert b.has("outer", "a") and not b.has("outer", "zz")


def test_unknown_member_is_keyerror() -> None:
    with pytest.raises(KeyError, match="no member"):
        Btf(TYPES).offset("outer", "nope")
