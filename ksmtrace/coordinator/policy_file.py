"""Policy files: TOML text -> a validated :class:`~.policy.Policy`, or every mistake with its line.

The layout (documented key by key in docs/examples/policy.toml)::

    mode, interval, self_opted, narrow_self_opted, on_stop, log   top-level keys
    [[candidate]] / [[never]]    rules: comm, exe, cgroup, uid (AND across keys, OR inside one)
    [[domain]]                   name + the same criteria
    [runs] [churn] [ksmd]        tables of numbers, durations and a percentage

tomllib reads the text and says nothing about where a key was written, so
:class:`Locator` scans the (already valid) text once and maps every table,
array-of-tables entry, key and array element to its line. Checks never stop
at the first mistake: each adds ``(line, sentence)`` and the whole list is
raised at the end as one :class:`PolicyError`.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Union

import tomllib

from ksmtrace.coordinator.policy import Churn, Dashboard, Domain, Ksmd, Match, Policy, PolicyError, Runs
from ksmtrace.errors import UsageError

KeyPath = tuple[Union[str, int], ...]  # ("candidate", 2, "uid", 0): keys, array indexes

UID_MAX = 2**32 - 2  # (uid_t)-1 is "no uid" to the kernel
UINT_MAX = 2**32 - 1  # ksmd's pages_to_scan and sleep_millisecs are unsigned ints


# -- where things are --------------------------------------------------------------------------------


class Locator:
    """Line of each table, ``[[array]]`` entry, key and array element of valid TOML text.

    A scanner, not a parser: it relies on tomllib having accepted the text, and
    only tracks what decides where a key sits (headers, dotted and quoted keys,
    strings that may hold '#', '[' or newlines, nested arrays and inline
    tables, comments). Should it meet something it does not follow, it stops
    and :meth:`line` falls back to the nearest enclosing entry it did record.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lineno = 1
        self.lines: dict[KeyPath, int] = {}
        self._aot_count: dict[tuple[str, ...], int] = {}
        try:
            self._document()
        except (IndexError, ValueError, RecursionError):
            pass  # a partial map: line() falls back to enclosing entries

    def line(self, path: KeyPath) -> int:
        """The line of ``path``, else of its longest recorded prefix, else 1."""
        for n in range(len(path), 0, -1):
            found = self.lines.get(path[:n])
            if found is not None:
                return found
        return 1

    # The scanner. ``pos`` moves only through _advance(), which counts newlines.

    def _peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def _advance(self, n: int = 1) -> None:
        self.lineno += self.text.count("\n", self.pos, self.pos + n)
        self.pos += n

    def _skip(self, newlines: bool) -> None:
        """Blanks and comments; also line breaks when ``newlines``."""
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t" or (newlines and c in "\r\n"):
                self._advance()
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self._advance((len(self.text) if end < 0 else end) - self.pos)
            else:
                return

    def _expect(self, token: str) -> None:
        if self._peek(len(token)) != token:
            raise ValueError(f"expected {token!r} at line {self.lineno}")
        self._advance(len(token))

    def _string(self) -> str:
        for quote in ('"""', "'''", '"', "'"):
            if self._peek(len(quote)) == quote:
                break
        else:
            raise ValueError("not a string")
        start = self.pos
        self._advance(len(quote))
        while True:
            if self.pos >= len(self.text):
                raise ValueError("unterminated string")
            if quote[0] == '"' and self.text[self.pos] == "\\":
                self._advance(2)
            elif self._peek(len(quote)) == quote:
                self._advance(len(quote))
                # A multi-line string may end in up to two more quotes of its kind.
                while len(quote) == 3 and self._peek() == quote[0] and self.pos - start < len(self.text):
                    self._advance()
                    if self._peek() != quote[0]:
                        break
                break
            else:
                self._advance()
        raw = self.text[start : self.pos]
        if quote == "'" or "\\" not in raw:
            return raw[len(quote) : -len(quote)]
        # Escapes in a quoted key: let tomllib decode them exactly as it did when parsing.
        return str(tomllib.loads(f"k = {raw}")["k"])

    def _key(self) -> list[str]:
        parts = []
        while True:
            self._skip(newlines=False)
            if self._peek() in ('"', "'"):
                parts.append(self._string())
            else:
                m = re.compile(r"[A-Za-z0-9_-]+").match(self.text, self.pos)
                if not m:
                    raise ValueError("not a key")
                parts.append(m.group())
                self._advance(len(m.group()))
            self._skip(newlines=False)
            if self._peek() != ".":
                return parts
            self._advance()

    def _record_key(self, table: KeyPath, keys: list[str], line: int) -> KeyPath:
        # A dotted key also names the tables it passes through; the first mention wins.
        path = table
        for k in keys:
            path = (*path, k)
            self.lines.setdefault(path, line)
        return path

    def _value(self, path: KeyPath) -> None:
        c = self._peek()
        if c == "[":
            self._advance()
            index = 0
            while True:
                self._skip(newlines=True)
                if self._peek() == "]":
                    self._advance()
                    return
                self.lines.setdefault((*path, index), self.lineno)
                self._value((*path, index))
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._advance()
                    index += 1
        elif c == "{":
            self._advance()
            while True:
                self._skip(newlines=True)
                if self._peek() == "}":
                    self._advance()
                    return
                line = self.lineno
                inner = self._record_key(path, self._key(), line)
                self._expect("=")
                self._skip(newlines=False)
                self._value(inner)
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._advance()
        elif c in ('"', "'"):
            self._string()
        else:
            # Numbers, booleans, dates (which may hold one space): up to a delimiter.
            m = re.compile(r"[^,\]}\r\n#]*").match(self.text, self.pos)
            if not m or not m.group().strip():
                raise ValueError("not a value")
            self._advance(len(m.group().rstrip()))

    def _header(self, keys: list[str], aot: bool) -> KeyPath:
        path: KeyPath = ()
        for i, k in enumerate(keys):
            path = (*path, k)
            name = tuple(keys[: i + 1])
            if aot and i == len(keys) - 1:
                self._aot_count[name] = self._aot_count.get(name, 0) + 1
                self.lines.setdefault(path, self.lineno)
                path = (*path, self._aot_count[name] - 1)
            elif name in self._aot_count:
                path = (*path, self._aot_count[name] - 1)  # [a.b] under the latest [[a]]
        self.lines.setdefault(path, self.lineno)
        return path

    def _document(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self.pos >= len(self.text):
                return
            before = self.pos
            if self._peek(2) == "[[":
                self._advance(2)
                table = self._header(self._key(), aot=True)
                self._expect("]]")
            elif self._peek() == "[":
                self._advance()
                table = self._header(self._key(), aot=False)
                self._expect("]")
            else:
                line = self.lineno
                path = self._record_key(table, self._key(), line)
                self._expect("=")
                self._skip(newlines=False)
                self._value(path)
            if self.pos == before:
                raise ValueError("no progress")


# -- values ------------------------------------------------------------------------------------------

_BAD = object()  # a value that failed its check (already reported)
_DURATION = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h|d)\s*", re.IGNORECASE)
_PERCENT = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*%\s*")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Longer is a mistake (a unit slip), and a sleep that long overflows time.sleep().
DURATION_MAX_S = 7 * 86400.0


def _kind(v: Any) -> str:
    """A TOML value's type in the words of the TOML spec."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return "a date/time"


def _show(v: Any) -> str:
    """A value as written back in a message: repr() keeps a message on one line."""
    if isinstance(v, bool):
        text = "true" if v else "false"
    elif isinstance(v, (dict, list)):
        return _kind(v)
    else:
        text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _got(v: Any) -> str:
    return f"got {_show(v)}" + ("" if isinstance(v, (dict, list)) else f" ({_kind(v)})")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g}s"


@dataclass(frozen=True)
class _Key:
    """One key of a table: the record field it fills and the check that converts it."""

    field: str
    check: Callable[[_Checker, KeyPath, Any], Any]


def _where(path: KeyPath) -> str:
    """('candidate', 2, 'uid', 0) -> '[[candidate]] #3 uid[0]'; ('runs', 'x') -> '[runs] x'."""
    head, rest = "", path
    if len(path) >= 2 and path[0] in _RULE_TABLES and isinstance(path[1], int):
        head, rest = f"[[{path[0]}]] #{path[1] + 1}", path[2:]
    elif len(path) >= 2 and path[0] in _TABLES:
        head, rest = f"[{path[0]}]", path[1:]
    key = ""
    for p in rest:
        key += f"[{p}]" if isinstance(p, int) else ("." if key else "") + str(p)
    return f"{head} {key}".strip() or "the policy"


class _Checker:
    """Turns tomllib's dict into records, collecting every problem with its line."""

    def __init__(self, text: str) -> None:
        self.loc = Locator(text)
        self.problems: list[tuple[int, str]] = []

    def fail(self, path: KeyPath, message: str) -> object:
        self.problems.append((self.loc.line(path), f"{_where(path)}: {message}"))
        return _BAD

    # Scalars. Each returns the converted value or _BAD (after reporting).

    def integer(self, path: KeyPath, v: Any, lo: int, hi: int = UINT_MAX) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):
            return self.fail(path, f"expected an integer from {lo} to {hi}, {_got(v)}")
        if not lo <= v <= hi:
            return self.fail(path, f"expected an integer from {lo} to {hi}, got {v}")
        return v

    def number(self, path: KeyPath, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> Any:
        want = f"a number {'above' if lo_open else 'of at least'} {lo:g}"
        if hi != math.inf:
            want += f" and at most {hi:g}"
        if not _is_number(v):
            return self.fail(path, f"expected {want}, {_got(v)}")
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            return self.fail(path, f"expected {want}, got {v}")
        return float(v)

    def boolean(self, path: KeyPath, v: Any) -> Any:
        if not isinstance(v, bool):
            return self.fail(path, f"expected true or false, {_got(v)}")
        return v

    def choice(self, path: KeyPath, v: Any, choices: tuple[str, ...]) -> Any:
        if v not in choices or not isinstance(v, str):
            return self.fail(path, f"expected one of {', '.join(map(repr, choices))}, {_got(v)}")
        return v

    def duration(self, path: KeyPath, v: Any, allow_zero: bool = False) -> Any:
        """'500ms', '10s', '5m', '1h', '1d' or a number of seconds -> seconds (at most 7 days)."""
        want = 'a duration like "500ms", "10s", "5m" or a number of seconds'
        if _is_number(v):
            seconds = float(v)
        elif isinstance(v, str) and (m := _DURATION.fullmatch(v)):
            seconds = float(m.group(1)) * _UNIT_S[m.group(2).lower()]
        else:
            hint = " (a unit is needed: ms, s, m, h or d)" if isinstance(v, str) and _is_float(v) else ""
            return self.fail(path, f"expected {want}{hint}, {_got(v)}")
        if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
            least = "of at least 0" if allow_zero else "above 0"
            return self.fail(path, f'expected a duration {least} (like "10s"), got {_show(v)}')
        if seconds > DURATION_MAX_S:
            return self.fail(path, f'expected a duration of at most 7 days ("7d"), got {_show(v)}')
        return seconds

    def percent(self, path: KeyPath, v: Any) -> Any:
        """'5%' or 5 -> 5.0: a share of one core, which is all ksmd (one thread) can use."""
        want = 'a share of one core like "5%" or "0.5%", above 0% and at most 100%'
        if _is_number(v):
            pct = float(v)
        elif isinstance(v, str) and (m := _PERCENT.fullmatch(v)):
            pct = float(m.group(1))
        else:
            return self.fail(path, f"expected {want}, {_got(v)}")
        if not math.isfinite(pct) or not 0 < pct <= 100:
            return self.fail(path, f"expected {want}, got {_show(v)}")
        return pct

    def milliseconds(self, path: KeyPath, v: Any) -> Any:
        seconds = self.duration(path, v, allow_zero=True)
        if seconds is _BAD:
            return _BAD
        ms = seconds * 1000
        if abs(ms - round(ms)) > 1e-6 or round(ms) > UINT_MAX:
            return self.fail(
                path, f"expected a whole number of milliseconds up to {UINT_MAX}, got {_show(v)}"
            )
        return round(ms)

    def listen(self, path: KeyPath, v: Any) -> Any:
        from ksmtrace.live.server import parse_listen  # the one parser --listen uses too

        if not isinstance(v, str):
            return self.fail(path, f'expected "HOST:PORT", "PORT" or "off", {_got(v)}')
        try:
            parse_listen(v)
        except UsageError as exc:
            return self.fail(path, str(exc).replace("--listen ", "", 1))
        return v

    def log_path(self, path: KeyPath, v: Any) -> Any:
        if not isinstance(v, str) or (v and not v.startswith("/")):
            return self.fail(path, f'expected an absolute file path or "" (stdout only), {_got(v)}')
        return v

    # Tables.

    def table(self, path: KeyPath, v: Any, keys: dict[str, _Key], what: str) -> dict[str, Any]:
        """Known keys checked into {field: value or _BAD}; unknown keys reported with a guess."""
        out: dict[str, Any] = {}
        if not isinstance(v, dict):
            self.fail(path, f"expected {what}, {_got(v)}")
            return out
        for key, value in v.items():
            spec = keys.get(key)
            if spec is None:
                self.unknown((*path, key), key, keys)
            else:
                out[spec.field] = spec.check(self, (*path, key), value)
        return out

    def unknown(self, path: KeyPath, key: str, known: dict[str, Any]) -> None:
        # 0.5: 'min_sise' still finds 'min_saving_pages'; unrelated words find nothing.
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
        self.fail(path, f"unknown key {_show(key)}; {hint}")

    def strings(self, path: KeyPath, v: Any, what: str, check: Callable[[str], str] | None = None) -> Any:
        """A string or an array of strings -> a tuple; ``check`` says what is wrong with one."""
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not v:
            return self.fail(
                path, f"an empty array matches nothing: give at least one {what} or drop the key"
            )
        out = []
        for i, item in enumerate(values):
            where = (*path, i) if isinstance(v, list) else path
            if not isinstance(item, str) or not item:
                self.fail(where, f"expected {what} (a non-empty string) or an array of them, {_got(item)}")
                continue
            wrong = check(item) if check else ""
            if wrong:
                self.fail(where, f"{wrong}, got {_show(item)}")
                continue
            # A trailing slash names the same cgroup: keep one spelling for comparisons.
            out.append((item.rstrip("/") or "/") if item.startswith("/") else item)
        return tuple(out) if len(out) == len(values) else _BAD

    def uids(self, path: KeyPath, v: Any) -> Any:
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not v:
            return self.fail(path, "an empty array matches nothing: give at least one uid or drop the key")
        ok = True
        for i, item in enumerate(values):
            where = (*path, i) if isinstance(v, list) else path
            if isinstance(item, bool) or not isinstance(item, int):
                extra = " (user names are not resolved: give the number)" if isinstance(item, str) else ""
                ok = False
                self.fail(where, f"expected a numeric uid or an array of them{extra}, {_got(item)}")
            elif not 0 <= item <= UID_MAX:
                ok = False
                self.fail(where, f"expected a uid from 0 to {UID_MAX}, got {item}")
        return tuple(values) if ok else _BAD

    def match(self, path: KeyPath, v: Any, with_name: bool) -> tuple[Match, Any]:
        """A [[candidate]], [[never]] or [[domain]] entry -> (Match, name or None)."""
        keys = dict(_MATCH_KEYS)
        if with_name:
            keys["name"] = _Key("name", lambda c, p, x: c.name(p, x))
        got = self.table(path, v, keys, "a table of criteria (comm, exe, cgroup, uid)")
        line = self.loc.line(path)
        if isinstance(v, dict):
            if with_name and "name" not in v:
                self.fail(path, 'a [[domain]] needs a name: add name = "..." (used in decisions and logs)')
            if not any(k in v for k in _MATCH_KEYS):
                table = path[0] if path and isinstance(path[0], str) else "rule"
                self.fail(
                    path,
                    f"an empty [[{table}]] matches no process: give at least one of comm, exe, cgroup, uid",
                )
        fields = {k: val for k, val in got.items() if val is not _BAD and k != "name"}
        return Match(line=line, **fields), got.get("name")

    def name(self, path: KeyPath, v: Any) -> Any:
        if not isinstance(v, str) or not v.strip():
            return self.fail(path, f"expected a non-empty string naming the domain, {_got(v)}")
        return v

    def rules(self, doc: dict[str, Any], key: str, with_name: bool) -> list[tuple[Match, Any, KeyPath]]:
        v = doc.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail((key,), f"expected an array of tables: write [[{key}]] once per rule, {_got(v)}")
            return []
        out = []
        for i, entry in enumerate(v):
            path: KeyPath = (key, i)
            if not isinstance(entry, dict):
                self.fail(path, f"expected a table of criteria (write [[{key}]]), {_got(entry)}")
                continue
            m, name = self.match(path, entry, with_name)
            out.append((m, name, path))
        return out


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _cgroup_wrong(path: str) -> str:
    if not path.startswith("/"):
        return 'expected a cgroup v2 path starting with "/" (as in /proc/PID/cgroup, e.g. "/machine.slice")'
    if any(part in (".", "..") for part in path.split("/")):
        return 'expected a cgroup path without "." or ".." parts'
    return ""


_MATCH_KEYS: dict[str, _Key] = {
    "comm": _Key("comm", lambda c, p, v: c.strings(p, v, "a process name (comm)")),
    "exe": _Key("exe", lambda c, p, v: c.strings(p, v, "an executable path or basename")),
    "cgroup": _Key("cgroup", lambda c, p, v: c.strings(p, v, "a cgroup path", _cgroup_wrong)),
    "uid": _Key("uid", lambda c, p, v: c.uids(p, v)),
}

_RUNS: dict[str, _Key] = {
    "min_run_pages": _Key("min_run_pages", lambda c, p, v: c.integer(p, v, 1)),
    "max_gap_pages": _Key("max_gap_pages", lambda c, p, v: c.integer(p, v, 0)),
    "min_saving_pages": _Key("min_saving_pages", lambda c, p, v: c.integer(p, v, 1)),
    "stable_looks": _Key("stable_looks", lambda c, p, v: c.integer(p, v, 1)),
    "max_ranges_per_process": _Key("max_ranges_per_process", lambda c, p, v: c.integer(p, v, 1)),
    "max_map_count_share": _Key("max_map_count_share", lambda c, p, v: c.number(p, v, 0, 1, lo_open=True)),
    "relook": _Key("relook", lambda c, p, v: c.choice(p, v, ("soft-dirty", "rescan"))),
}
_CHURN: dict[str, _Key] = {
    "max_cow_per_page_min": _Key("max_cow_per_page_min", lambda c, p, v: c.number(p, v, 0)),
    # Every merging page has at least one rmap item: a ratio under 1 would unmerge everything.
    "max_rmap_per_merged": _Key("max_rmap_per_merged", lambda c, p, v: c.number(p, v, 1)),
    "window": _Key("window_s", lambda c, p, v: c.duration(p, v)),
    "cooldown": _Key("cooldown_s", lambda c, p, v: c.duration(p, v, allow_zero=True)),
}
_KSMD: dict[str, _Key] = {
    "budget": _Key("budget_pct", lambda c, p, v: c.percent(p, v)),
    "full_scan": _Key("full_scan_s", lambda c, p, v: c.duration(p, v)),
    "advisor": _Key("advisor", lambda c, p, v: c.choice(p, v, ("off", "kernel"))),
    "min_pages_to_scan": _Key("min_pages_to_scan", lambda c, p, v: c.integer(p, v, 1)),
    "max_pages_to_scan": _Key("max_pages_to_scan", lambda c, p, v: c.integer(p, v, 1)),
    "sleep": _Key("sleep_millisecs", lambda c, p, v: c.milliseconds(p, v)),
}
_DASHBOARD: dict[str, _Key] = {
    "listen": _Key("listen", lambda c, p, v: c.listen(p, v)),
    # Series per process: bounded (a scrape of 1,000 processes at top_n 100 takes ~25 ms: bench_metrics).
    "top_n": _Key("top_n", lambda c, p, v: c.integer(p, v, 1, 100)),
}
_TOP: dict[str, _Key] = {
    "mode": _Key("mode", lambda c, p, v: c.choice(p, v, ("observe", "enforce"))),
    "interval": _Key("interval_s", lambda c, p, v: c.duration(p, v)),
    "self_opted": _Key("self_opted", lambda c, p, v: c.boolean(p, v)),
    "narrow_self_opted": _Key("narrow_self_opted", lambda c, p, v: c.boolean(p, v)),
    "on_stop": _Key("on_stop", lambda c, p, v: c.choice(p, v, ("keep", "unmerge"))),
    "log": _Key("log", lambda c, p, v: c.log_path(p, v)),
}
_TABLES: dict[str, dict[str, _Key]] = {"runs": _RUNS, "churn": _CHURN, "ksmd": _KSMD, "dashboard": _DASHBOARD}
_RULE_TABLES = ("candidate", "never", "domain")
KNOWN_TOP_KEYS = (*_TOP, *_RULE_TABLES, *_TABLES)


def _valid(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not _BAD}


def _check(doc: dict[str, Any], text: str, source: str) -> Policy:
    c = _Checker(text)
    top: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in doc.items():
        if key in _TOP:
            top[_TOP[key].field] = _TOP[key].check(c, (key,), value)
        elif key in _TABLES:
            tables[key] = c.table((key,), value, _TABLES[key], f"a table: write [{key}]")
        elif key not in _RULE_TABLES:
            c.unknown((key,), key, dict.fromkeys(KNOWN_TOP_KEYS))
    candidates = c.rules(doc, "candidate", with_name=False)
    never = c.rules(doc, "never", with_name=False)
    domains: list[Domain] = []
    seen: dict[str, int] = {}
    for m, name, path in c.rules(doc, "domain", with_name=True):
        if not isinstance(name, str):
            continue  # missing or wrong: reported already
        if name in seen:
            c.fail(
                (*path, "name"),
                f"domain {_show(name)} is already defined on line {seen[name]}: names must differ",
            )
            continue
        seen[name] = c.loc.line((*path, "name"))
        domains.append(Domain(name=name, match=m))

    # Checks across keys, only between values that passed their own check
    # (a default standing in for a wrong value would make up a second mistake).
    runs, churn, ksmd = (tables.get(t, {}) for t in ("runs", "churn", "ksmd"))
    lo, hi = (
        ksmd.get("min_pages_to_scan", Ksmd.min_pages_to_scan),
        ksmd.get("max_pages_to_scan", Ksmd.max_pages_to_scan),
    )
    if _BAD not in (lo, hi) and lo > hi:
        key = "max_pages_to_scan" if "max_pages_to_scan" in ksmd else "min_pages_to_scan"
        c.fail(
            ("ksmd", key), f"min_pages_to_scan ({lo}) is above max_pages_to_scan ({hi}): expected min <= max"
        )
    interval = top.get("interval_s", Policy.interval_s)
    window = churn.get("window_s", Churn.window_s)
    if _BAD not in (interval, window) and window < interval:
        key_path: KeyPath = ("churn", "window") if "window_s" in churn else ("interval",)
        c.fail(
            key_path,
            f"churn window {_fmt_s(window)} is shorter than interval {_fmt_s(interval)}: "
            "a rate needs at least one look in its window",
        )
    has_candidates = bool(candidates)
    self_opted = top.get("self_opted", Policy.self_opted)
    if (
        top.get("mode") == "enforce"
        and not has_candidates
        and self_opted is False
        and not doc.get("candidate")
    ):
        c.fail(
            ("mode",),
            '"enforce" has nothing to do: no [[candidate]] rule and self_opted = false; '
            'add a [[candidate]], set self_opted = true, or use mode = "observe"',
        )
    if c.problems:
        raise PolicyError(source, c.problems)
    return Policy(
        **_valid(top),
        candidates=tuple(m for m, _, _ in candidates),
        never=tuple(m for m, _, _ in never),
        domains=tuple(domains),
        runs=Runs(**_valid(runs)),
        churn=Churn(**_valid(churn)),
        ksmd=Ksmd(**_valid(ksmd)),
        dashboard=Dashboard(**_valid(tables.get("dashboard", {}))),
        source=source,
    )


# -- entry points --------------------------------------------------------------------------------


def _last_line(text: str) -> int:
    # "end of document": the last line with something on it, where the missing part belongs.
    return text.rstrip().count("\n") + 1


def _toml_problem(text: str, exc: Exception) -> tuple[int, str]:
    """tomllib's 'MSG (at line L, column C)' as (L, sentence); newer Pythons also give attributes."""
    message = str(exc)
    m = re.fullmatch(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", message, re.DOTALL)
    if m:
        msg = m.group(1)
        line = int(m.group(2)) if m.group(2) else _last_line(text)
        where = f" at column {m.group(3)}" if m.group(3) else " at the end of the file"
    else:
        msg, line, where = message, int(getattr(exc, "lineno", 0) or 1), ""
    msg = " ".join(msg.split())  # one line, whatever the message held
    return max(1, min(line, text.count("\n") + 1)), f"not valid TOML{where}: {msg}"


def parse(text: str, source: str = "<policy>") -> Policy:
    """Validate a policy's TOML text; ``source`` names it in messages (``source:LINE: ...``)."""
    if text.startswith("\ufeff"):
        text = text[1:]  # a BOM some editors write; TOML itself has no place for it
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, [_toml_problem(text, exc)]) from None
    except (ValueError, RecursionError) as exc:
        # Not TOMLDecodeError: an integer past Python's digit limit, arrays nested past the stack.
        what = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())
        raise PolicyError(source, [(1, f"not a TOML policy this parser can read: {what}")]) from None
    return _check(doc, text, source)


def parse_bytes(data: bytes, source: str = "<policy>") -> Policy:
    """Like :func:`parse`, from a file's bytes: text that is not UTF-8 is refused with its line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PolicyError(
            source,
            [(line, f"byte 0x{data[exc.start]:02x} at column {col} is not UTF-8: expected UTF-8 text")],
        ) from None
    return parse(text, source)


def load(path: str | PathLike[str]) -> Policy:
    """Read and validate a policy file; an unreadable file is a PolicyError without a line."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PolicyError(str(p), [(0, f"cannot read the policy: {exc.strerror or exc}")]) from None
    return parse_bytes(data, str(p))
