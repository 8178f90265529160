"""Records to JSON and back, so that a Snapshot can be recorded and replayed.

The golden-output tests render every view from snapshots captured on the real
kernel (tests/fixtures/snapshots); the daemon will hand the same records to
``top --connect``. Records are frozen dataclasses whose fields are typed, so
decoding is driven by the type hints: no class names travel in the JSON.
Mappings with non-string keys (``(start, end)`` tuples, pids) are written as
lists of ``[key, value]`` pairs under ``"__items__"``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def encode(obj: Any) -> Any:
    """A JSON-able tree of ``obj`` (dataclasses become dicts of their fields)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"__items__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, frozenset | set):
        return sorted((encode(v) for v in obj), key=repr)
    if isinstance(obj, list | tuple):
        return [encode(v) for v in obj]
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(tp: Any, data: Any) -> Any:
    """The value of type ``tp`` that :func:`encode` turned into ``data``."""
    if tp is Any or tp is object:
        return data
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return decode(arg, data)
            except (TypeError, ValueError, KeyError) as exc:
                errors.append(exc)
        raise TypeError(f"{data!r} fits none of {tp}: {errors}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise TypeError(f"{tp.__name__} wants an object, got {data!r}")
        hints = _hints(tp)
        kw = {f.name: decode(hints[f.name], data[f.name]) for f in dataclasses.fields(tp) if f.name in data}
        return tp(**kw)
    if origin in (dict, typing.Mapping) or tp is dict:
        kt, vt = args or (Any, Any)
        pairs = data["__items__"] if isinstance(data, dict) and "__items__" in data else data.items()
        return {decode(kt, k): decode(vt, v) for k, v in pairs}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in data)
        if args:
            return tuple(decode(a, v) for a, v in zip(args, data, strict=True))
        return tuple(data)
    if origin in (list, frozenset, set):
        (et,) = args or (Any,)
        return origin(decode(et, v) for v in data)
    if tp is float and isinstance(data, int):
        return float(data)
    if tp in (int, float, str, bool) and not isinstance(data, tp):
        raise TypeError(f"{tp.__name__} wanted, got {data!r}")
    return data


def load(cls: type[T], data: Any) -> T:
    """Typed entry point: ``load(Snapshot, json.load(f))``."""
    return typing.cast(T, decode(cls, data))
