"""The policy parser: a valid file becomes the Policy it says; every mistake is refused with its line.

Example tests pin the messages (``FILE:LINE: where: what is wrong, what is
expected``); hypothesis feeds the parser what a person or a fuzzer could
write (random text and bytes, documents of valid keys with values of every
TOML type, valid documents mutated, a wrong value in any layout) and checks
that it either returns a Policy or raises PolicyError whose every line names
the file and a line that exists, and nothing else ever escapes.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmtrace.coordinator.policy import (
    DEFAULT,
    Churn,
    Domain,
    Ksmd,
    Match,
    Policy,
    PolicyError,
    Runs,
    load,
    parse,
)
from ksmtrace.coordinator.policy_file import Locator, parse_bytes
from ksmtrace.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
SRC = "policy.toml"

# Enough to find what these properties catch while the unit suite stays quick
# on a 2-CPU CI machine (about 2 s each); fewer inside the emulated test VM,
# where the parser (pure Python) is the same and only slower;
# KSMTRACE_FUZZ_EXAMPLES=20000 for a deep run. No example database, so
# nothing is written into the tree.
_EXAMPLES = "50" if os.environ.get("KSMTRACE_IN_VM") == "1" else "300"
FUZZ = settings(
    max_examples=int(os.environ.get("KSMTRACE_FUZZ_EXAMPLES", _EXAMPLES)),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Drawing whole documents costs more per example than the parse it checks.
FUZZ_DOCS = settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 3))


def problems(text: str) -> list[tuple[int, str]]:
    """The parser's complaints as (line, 'where: sentence'), checked to be well formed."""
    with pytest.raises(PolicyError) as info:
        parse(text, SRC)
    assert_well_formed(str(info.value), text)
    return [(line, msg) for line, msg in info.value.problems]


def assert_well_formed(message: str, text: str) -> None:
    # tomllib counts lines by "\n" alone; so do messages.
    last = text.count("\n") + 1
    lines = message.split("\n")
    assert lines and all(lines), message
    for line in lines:
        m = re.match(rf"{re.escape(SRC)}:(\d+): \S", line)
        assert m, f"not 'FILE:LINE: ...': {line!r}"
        assert 1 <= int(m.group(1)) <= last, f"line {m.group(1)} is not in a {last}-line text: {line!r}"


def parses_or_refuses(text: str) -> None:
    """The property: a Policy, or a PolicyError with well-formed lines; any other exception fails."""
    try:
        policy = parse(text, SRC)
    except PolicyError as exc:
        assert exc.problems
        assert_well_formed(str(exc), text)
    else:
        assert isinstance(policy, Policy)


# -- valid policies -----------------------------------------------------------------------------------

FULL = """\
mode = "enforce"
interval = "500ms"
self_opted = false
narrow_self_opted = true
on_stop = "unmerge"
log = "/var/log/ksmtrace/d.jsonl"

[[candidate]]
comm = ["qemu-system-x86", "qemu-kvm"]
cgroup = "/machine.slice/"
[[candidate]]
exe = "/usr/bin/python3"
uid = [1000, 1001]

[[never]]
uid = 0

[[domain]]
name = "tenant-a"
cgroup = "/machine.slice/a.scope"
[[domain]]
name = "tenant-b"
comm = "b"

[runs]
min_run_pages = 2
max_gap_pages = 0
min_saving_pages = 32
stable_looks = 3
max_ranges_per_process = 64
max_map_count_share = 1

[churn]
max_cow_per_page_min = 0.25
max_rmap_per_merged = 8
window = "2m"
cooldown = 0

[ksmd]
budget = "2.5%"
full_scan = "1h"
advisor = "kernel"
min_pages_to_scan = 100
max_pages_to_scan = 100
sleep = 0.05
"""


def test_full_policy_round_trip() -> None:
    assert parse(FULL, SRC) == Policy(
        mode="enforce",
        interval_s=0.5,
        self_opted=False,
        narrow_self_opted=True,
        on_stop="unmerge",
        log="/var/log/ksmtrace/d.jsonl",
        candidates=(
            # A trailing slash names the same cgroup: one spelling.
            Match(comm=("qemu-system-x86", "qemu-kvm"), cgroup=("/machine.slice",), line=8),
            Match(exe=("/usr/bin/python3",), uid=(1000, 1001), line=11),
        ),
        never=(Match(uid=(0,), line=15),),
        domains=(
            Domain("tenant-a", Match(cgroup=("/machine.slice/a.scope",), line=18)),
            Domain("tenant-b", Match(comm=("b",), line=21)),
        ),
        runs=Runs(2, 0, 32, 3, 64, 1.0),
        churn=Churn(0.25, 8.0, 120.0, 0.0),
        ksmd=Ksmd(2.5, 3600.0, "kernel", 100, 100, 50),
        source=SRC,
    )


def test_empty_file_is_the_default_policy() -> None:
    assert parse("", SRC) == Policy(source=SRC)
    assert parse("# nothing\n\n", SRC) == Policy(source=SRC)
    assert DEFAULT.mode == "observe"


@pytest.mark.parametrize("name", ["policy.toml", "policy-observe.toml"])
def test_examples_parse(name: str) -> None:
    policy = load(EXAMPLES / name)
    assert policy.source == str(EXAMPLES / name)
    assert policy.mode == "observe"  # a sample copied as is changes nothing


def test_sample_states_the_real_defaults() -> None:
    """docs/examples/policy.toml sets every tuning key to the default it names."""
    sample = load(EXAMPLES / "policy.toml")
    assert (sample.runs, sample.churn, sample.ksmd, sample.dashboard) == (
        DEFAULT.runs,
        DEFAULT.churn,
        DEFAULT.ksmd,
        DEFAULT.dashboard,
    )
    assert (sample.interval_s, sample.self_opted, sample.narrow_self_opted, sample.on_stop) == (
        DEFAULT.interval_s,
        DEFAULT.self_opted,
        DEFAULT.narrow_self_opted,
        DEFAULT.on_stop,
    )
    text = (EXAMPLES / "policy.toml").read_text()
    for key in ("runs", "churn", "ksmd", "dashboard"):
        assert f"[{key}]" in text
    # Every key the parser knows appears in the sample.
    from ksmtrace.coordinator import policy_file

    for table, keys in {"": policy_file._TOP, **policy_file._TABLES}.items():
        for key in keys:
            assert re.search(rf"^{key}\s*=", text, re.M), (
                f"{table or 'top level'}: {key} missing from the sample"
            )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ('"500ms"', 0.5),
        ('"10s"', 10.0),
        ('"5m"', 300.0),
        ('"1h"', 3600.0),
        ("7", 7.0),
        ("0.25", 0.25),
        ('"1d"', 86400.0),
    ],
)
def test_durations(value: str, seconds: float) -> None:
    assert parse(f"interval = {value}\n[churn]\nwindow = '7d'", SRC).interval_s == seconds


@pytest.mark.parametrize(("value", "pct"), [('"5%"', 5.0), ('"0.5 %"', 0.5), ("100", 100.0), ("2.5", 2.5)])
def test_budget(value: str, pct: float) -> None:
    assert parse(f"[ksmd]\nbudget = {value}", SRC).ksmd.budget_pct == pct


def test_other_layouts_mean_the_same() -> None:
    """Dotted keys, inline tables and an inline array of tables are the same policy, lines aside."""
    dotted = parse('runs.min_run_pages = 5\nksmd.budget = "1%"\n[[candidate]]\nuid = 7\n', SRC)
    inline = parse(
        'runs = { min_run_pages = 5 }\nksmd = {budget="1%"}\ncandidate = [\n  {uid = 7},\n]\n', SRC
    )
    assert dotted.runs == inline.runs == Runs(min_run_pages=5)
    assert dotted.ksmd.budget_pct == inline.ksmd.budget_pct == 1.0
    assert dotted.candidates == (Match(uid=(7,), line=3),)
    assert inline.candidates == (Match(uid=(7,), line=4),)


def test_enforce_with_self_opted_only_is_fine() -> None:
    assert parse('mode = "enforce"', SRC).mode == "enforce"


# -- each mistake, in words ---------------------------------------------------------------------------


def test_toml_syntax_error_keeps_tomllib_line_and_column() -> None:
    # The sentence after the column is tomllib's own (it varies between Python versions).
    ((line, msg),) = problems('mode = "observe"\ninterval = 10s\n')
    assert line == 2 and re.match(r"not valid TOML at column \d+: \w", msg), msg
    ((line, msg),) = problems("[runs\nmin_run_pages = 1\n")
    assert line == 1 and msg.startswith("not valid TOML at column 6:")
    # Unclosed at the end: the last line with something on it.
    ((line, msg),) = problems("a = 1\nb = [1,\n\n\n")
    assert line == 2 and msg.startswith("not valid TOML at the end of the file: "), msg


def test_unknown_keys_suggest_the_closest() -> None:
    text = "intervall = 3\n[runs]\nmin_sise = 1\n[ksmd]\nbudget_pct = 5\nsleep_millisecs = 20\n"
    assert problems(text) == [
        (1, "intervall: unknown key 'intervall'; did you mean 'interval'?"),
        (3, "[runs] min_sise: unknown key 'min_sise'; did you mean 'min_saving_pages'?"),
        (5, "[ksmd] budget_pct: unknown key 'budget_pct'; did you mean 'budget'?"),
        (6, "[ksmd] sleep_millisecs: unknown key 'sleep_millisecs'; did you mean 'sleep'?"),
    ]
    ((line, msg),) = problems("[[candidate]]\ncomm = 'x'\nxyzzy = 1\n")
    assert line == 3 and msg.startswith(
        "[[candidate]] #1 xyzzy: unknown key 'xyzzy'; expected one of: comm, exe"
    )


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('mode = "on"', 1, "mode: expected one of 'observe', 'enforce', got 'on' (a string)"),
        ("self_opted = 1", 1, "self_opted: expected true or false, got 1 (an integer)"),
        ("on_stop = true", 1, "on_stop: expected one of 'keep', 'unmerge', got true (a boolean)"),
        ('log = "decisions.jsonl"', 1, 'log: expected an absolute file path or "" (stdout only), got'),
        ("interval = 0", 1, 'interval: expected a duration above 0 (like "10s"), got 0'),
        ('interval = "-1s"', 1, "interval: expected a duration above 0"),
        ('interval = "10"', 1, "(a unit is needed: ms, s, m, h or d), got '10' (a string)"),
        ('interval = "10 parsecs"', 1, 'interval: expected a duration like "500ms", "10s", "5m" or a number'),
        ("interval = nan", 1, "interval: expected a duration above 0"),
        ('interval = "8d"', 1, "interval: expected a duration of at most 7 days (\"7d\"), got '8d'"),
        ("interval = 1e300", 1, "expected a duration of at most 7 days"),
        ("interval = [1]", 1, "interval: expected a duration like"),
        (
            "\n[runs]\nmin_run_pages = 0",
            3,
            "[runs] min_run_pages: expected an integer from 1 to 4294967295, got 0",
        ),
        ("[runs]\nmin_run_pages = 2.0", 2, "got 2.0 (a float)"),
        ("[runs]\nmax_gap_pages = true", 2, "[runs] max_gap_pages: expected an integer from 0"),
        (
            "[runs]\nmax_map_count_share = 0",
            2,
            "max_map_count_share: expected a number above 0 and at most 1",
        ),
        ("[runs]\nmax_map_count_share = 1.01", 2, "got 1.01"),
        ("[churn]\nmax_cow_per_page_min = -1", 2, "expected a number of at least 0, got -1"),
        ("[churn]\nmax_rmap_per_merged = 0.5", 2, "expected a number of at least 1, got 0.5"),
        ('[churn]\ncooldown = "-5m"', 2, "[churn] cooldown: expected a duration of at least 0"),
        (
            '[churn]\nwindow = "1s"',
            2,
            "churn window 1s is shorter than interval 10s: a rate needs at least one",
        ),
        ('interval = "2m"', 1, "churn window 60s is shorter than interval 120s"),
        (
            '[ksmd]\nbudget = "-5%"',
            2,
            '[ksmd] budget: expected a share of one core like "5%" or "0.5%", above',
        ),
        ('[ksmd]\nbudget = "150%"', 2, "at most 100%, got '150%'"),
        ("[ksmd]\nbudget = 0", 2, "above 0% and at most 100%, got 0"),
        ('[ksmd]\nbudget = "five"', 2, "got 'five' (a string)"),
        ('[ksmd]\nfull_scan = "0ms"', 2, "[ksmd] full_scan: expected a duration above 0"),
        ('[ksmd]\nadvisor = "scan-time"', 2, "[ksmd] advisor: expected one of 'off', 'kernel'"),
        ('[ksmd]\nsleep = "1.5ms"', 2, "[ksmd] sleep: expected a whole number of milliseconds"),
        ("[ksmd]\nmin_pages_to_scan = 0", 2, "expected an integer from 1 to"),
        (
            "[ksmd]\nmin_pages_to_scan = 64\nmax_pages_to_scan = 8",
            3,
            "[ksmd] max_pages_to_scan: min_pages_to_scan (64) is above max_pages_to_scan (8): expected",
        ),
        (
            "[ksmd]\nmin_pages_to_scan = 20000",
            2,
            "min_pages_to_scan (20000) is above max_pages_to_scan (16384)",
        ),
        (
            "[[candidate]]\ncomm = 3",
            2,
            "[[candidate]] #1 comm: expected a process name (comm) (a non-empty string)",
        ),
        ("[[candidate]]\ncomm = []", 2, "comm: an empty array matches nothing: give at least one"),
        ('[[candidate]]\ncomm = ""', 2, "got '' (a string)"),
        ('[[candidate]]\ncgroup = "machine.slice"', 2, 'expected a cgroup v2 path starting with "/"'),
        ('[[candidate]]\ncgroup = "/a/../b"', 2, 'expected a cgroup path without "." or ".." parts'),
        (
            '[[never]]\nuid = "root"',
            2,
            "[[never]] #1 uid: expected a numeric uid or an array of them (user names",
        ),
        ("[[never]]\nuid = [0, -1]", 2, "[[never]] #1 uid[1]: expected a uid from 0 to 4294967294, got -1"),
        ("[[never]]\nuid = true", 2, "got true (a boolean)"),
        ("[[candidate]]\n\n[[candidate]]\nuid = 1", 1, "[[candidate]] #1: an empty [[candidate]] matches no"),
        ("[[never]]\n# only a comment\n", 1, "[[never]] #1: an empty [[never]] matches no process"),
        ("[[domain]]\ncgroup = '/a'", 1, '[[domain]] #1: a [[domain]] needs a name: add name = "..."'),
        (
            "[[domain]]\nname = ''\nuid = 1",
            2,
            "[[domain]] #1 name: expected a non-empty string naming the domain",
        ),
        ("[[domain]]\nname = 'a'", 1, "[[domain]] #1: an empty [[domain]] matches no process"),
        (
            "[[domain]]\nname = 'a'\nuid = 1\n[[domain]]\nname = 'a'\nuid = 2",
            5,
            "[[domain]] #2 name: domain 'a' is already defined on line 2: names must differ",
        ),
        ("runs = 3", 1, "runs: expected a table: write [runs], got 3 (an integer)"),
        ("[[runs]]\nmin_run_pages = 1", 1, "runs: expected a table: write [runs], got an array"),
        (
            "[candidate]\ncomm = 'x'",
            1,
            "candidate: expected an array of tables: write [[candidate]] once per rule",
        ),
        (
            "never = [1]",
            1,
            "[[never]] #1: expected a table of criteria (write [[never]]), got 1 (an integer)",
        ),
        (
            'mode = "enforce"\nself_opted = false\ncandidate = []',
            1,
            'mode: "enforce" has nothing to do: no [[candidate]] rule',
        ),
        (
            'mode = "enforce"\nself_opted = false',
            1,
            'mode: "enforce" has nothing to do: no [[candidate]] rule and self_opted = false; add a',
        ),
    ],
)
def test_mistake(text: str, line: int, message: str) -> None:
    found = problems(text)
    assert any(ln == line and message in msg for ln, msg in found), found
    assert len(found) == 1, found


def test_every_mistake_at_once_sorted_by_line() -> None:
    text = '[ksmd]\nbudget = "200%"\n[runs]\nmin_run_pages = -1\n[[never]]\nuid = "x"\n'
    with pytest.raises(PolicyError) as info:
        parse("mode = 'x'\n" + text, SRC)
    lines = str(info.value).split("\n")
    assert [ln.split(":")[1] for ln in lines] == ["1", "3", "5", "7"]
    assert lines[0] == f"{SRC}:1: mode: expected one of 'observe', 'enforce', got 'x' (a string)"


def test_policy_error_is_a_usage_error() -> None:
    with pytest.raises(PolicyError) as info:
        parse("mode = 1", SRC)
    assert isinstance(info.value, UsageError)
    assert info.value.exit_code == 2
    assert info.value.source == SRC


def test_a_value_echoed_back_never_breaks_the_one_line_per_mistake_rule() -> None:
    ((line, msg),) = problems('mode = "a\\nb"\n')
    assert "\n" not in msg and "'a\\nb'" in msg


# -- files --------------------------------------------------------------------------------------------


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(PolicyError) as info:
        load(path)
    assert str(info.value) == f"{path}: cannot read the policy: No such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b'mode = "observe"\nlog = "/var/\xff"\n')
    with pytest.raises(PolicyError) as info:
        load(path)
    assert str(info.value) == f"{path}:2: byte 0xff at column 13 is not UTF-8: expected UTF-8 text"


def test_bom_and_crlf_are_accepted() -> None:
    assert parse_bytes(b'\xef\xbb\xbfmode = "enforce"\r\n[[candidate]]\r\nuid = 5\r\n', SRC).candidates == (
        Match(uid=(5,), line=2),
    )


# -- the locator --------------------------------------------------------------------------------------


def test_locator_finds_keys_in_every_layout() -> None:
    text = """\
# [runs] in a comment is no header; neither is "[[candidate]]"
s = '''
[ksmd]
x = 1'''  # a multi-line string that looks like a table
"quoted.key" = { a = 1, "b c" = [1,
  2] }
runs.min_run_pages = 1
[[candidate]]
comm = "a#b"   # '#' inside a string
[[candidate]]  # second
uid = [
  0,
  # a comment between elements
  "root",
]
[ ksmd ]
sleep = 1979-05-27 07:32:00
'budget' = 1
[runs.nested]
k = 2
"""
    loc = Locator(text)
    assert loc.line(("s",)) == 2
    assert loc.line(("quoted.key", "a")) == 5
    assert loc.line(("quoted.key", "b c", 1)) == 6
    assert loc.line(("runs", "min_run_pages")) == 7
    assert loc.line(("candidate", 0)) == 8
    assert loc.line(("candidate", 0, "comm")) == 9
    assert loc.line(("candidate", 1)) == 10
    assert loc.line(("candidate", 1, "uid", 1)) == 14
    assert loc.line(("ksmd",)) == 16
    assert loc.line(("ksmd", "sleep")) == 17
    assert loc.line(("ksmd", "budget")) == 18
    assert loc.line(("runs", "nested", "k")) == 20
    # Unrecorded: the nearest enclosing entry, then line 1.
    assert loc.line(("candidate", 1, "exe")) == 10
    assert loc.line(("nothing",)) == 1


def test_locator_survives_what_it_does_not_follow() -> None:
    loc = Locator("a = 1\nb = ]\n[c]\n")
    assert loc.line(("a",)) == 1 and loc.line(("c",)) == 1  # stopped at 'b', no crash


# -- properties ---------------------------------------------------------------------------------------


@FUZZ
@given(st.text())
def test_any_text(text: str) -> None:
    parses_or_refuses(text)


@FUZZ
@given(st.binary())
def test_any_bytes(data: bytes) -> None:
    try:
        policy = parse_bytes(data, SRC)
    except PolicyError as exc:
        assert_well_formed(str(exc), data.decode("utf-8", "replace"))
    else:
        assert isinstance(policy, Policy)


TABLE_KEYS = {
    "": ["mode", "interval", "self_opted", "narrow_self_opted", "on_stop", "log"],
    "runs": [
        "min_run_pages",
        "max_gap_pages",
        "min_saving_pages",
        "stable_looks",
        "max_ranges_per_process",
        "max_map_count_share",
    ],
    "churn": ["max_cow_per_page_min", "max_rmap_per_merged", "window", "cooldown"],
    "ksmd": ["budget", "full_scan", "advisor", "min_pages_to_scan", "max_pages_to_scan", "sleep"],
}
RULE_KEYS = {"candidate": ["comm", "exe", "cgroup", "uid"], "never": ["comm", "exe", "cgroup", "uid"]}
RULE_KEYS["domain"] = ["name", *RULE_KEYS["candidate"]]

# A valid value for every key, so that one wrong value is the only mistake.
VALID = {
    "mode": '"observe"',
    "interval": '"10s"',
    "self_opted": "true",
    "narrow_self_opted": "false",
    "on_stop": '"keep"',
    "log": '"/var/log/k.jsonl"',
    "min_run_pages": "4",
    "max_gap_pages": "8",
    "min_saving_pages": "16",
    "stable_looks": "2",
    "max_ranges_per_process": "256",
    "max_map_count_share": "0.5",
    "max_cow_per_page_min": "1.0",
    "max_rmap_per_merged": "64",
    "window": '"60s"',
    "cooldown": '"10m"',
    "budget": '"5%"',
    "full_scan": '"60s"',
    "advisor": '"off"',
    "min_pages_to_scan": "16",
    "max_pages_to_scan": "16384",
    "sleep": '"20ms"',
    "comm": '["a", "b"]',
    "exe": '"/usr/bin/x"',
    "cgroup": '"/machine.slice"',
    "uid": "[0, 1]",
}
# Wrong for every key: no key takes a negative number or a date.
WRONG = ["-7", "1979-05-27", "[-7]", "[1979-05-27T07:32:00]"]


def scalar_literals() -> st.SearchStrategy[str]:
    """TOML literals of every type, many of them near what keys accept."""
    strings = st.one_of(
        st.sampled_from(["5%", "-5%", "150%", "10s", "0ms", "1.5ms", "-1s", "/", "/a", "a", "", "observe"]),
        st.sampled_from(["enforce", "keep", "unmerge", "kernel", "off", "5 m", "1e3s", "nan%", "inf s"]),
        st.text(max_size=12),
    ).map(lambda s: json.dumps(s, ensure_ascii=False))
    numbers = st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(
            lambda f: (
                "nan"
                if math.isnan(f)
                else ("inf" if f > 0 else "-inf")
                if abs(f) == float("inf")
                else repr(f)
            )
        ),
    )
    others = st.sampled_from(["true", "false", "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "{}", "[]"])
    return st.one_of(strings, numbers, others)


def literals() -> st.SearchStrategy[str]:
    return st.recursive(
        scalar_literals(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
            st.dictionaries(st.sampled_from(["comm", "uid", "x", "budget"]), inner, max_size=2).map(
                lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"
            ),
        ),
        max_leaves=4,
    )


KEY_NAMES = sorted({k for ks in (*TABLE_KEYS.values(), *RULE_KEYS.values()) for k in ks})
COMMENTS = st.sampled_from(["", "# [runs]", '# "x = [', "   # [[candidate]] ]] '''", "\t"])


def render(
    doc: list[tuple[str, list[tuple[str, str]]]], style: dict[str, str], comments: list[str]
) -> tuple[str, dict]:
    """Sections of (key, literal) as TOML text in a given layout; returns the text and each key's line.

    style per section: "header" ([runs] / [[candidate]] per entry), "dotted"
    (runs.key = v at the top), "inline" (runs = {...} / candidate = [ {...}, ... ]).
    """
    top: list[str] = []
    tail: list[str] = []
    where: dict[tuple, int] = {}
    notes = iter(comments * 50)

    def add(out: list[str], line: str, keys: list[tuple]) -> None:
        note = next(notes, "")
        if note.startswith("\t"):
            out.append(note.strip() or "# -")  # a comment line of its own
        out.append(line + (f"  {note}" if note.strip() else ""))
        for k in keys:
            where[k] = len(out)  # index within its block; made absolute below

    entries: dict[str, int] = {}
    for section, pairs in doc:
        if section == "":
            for k, v in pairs:
                add(top, f"{k} = {v}", [("top", k)])
            continue
        rule = section in RULE_KEYS
        n = entries.get(section, 0)
        entries[section] = n + 1
        ident = (section, n) if rule else (section,)
        mode = style.get(section, "header")
        if mode == "dotted" and not rule:
            for k, v in pairs:
                add(top, f"{section}.{k} = {v}", [("top", *ident, k)])
        elif mode == "inline":
            body = "{" + ", ".join(f"{k} = {v}" for k, v in pairs) + "}"
            if rule:
                # An inline array of tables is a top-level key: before every [header].
                if n == 0:
                    top.append(f"{section} = [")
                add(top, f"  {body},", [("top", *ident, k) for k, _ in pairs])
            else:
                add(top, f"{section} = {body}", [("top", *ident, k) for k, _ in pairs])
        else:
            tail.append(f"[[{section}]]" if rule else f"[{section}]")
            for k, v in pairs:
                add(tail, f"{k} = {v}", [("tail", *ident, k)])
        if mode == "inline" and rule and n + 1 == sum(1 for s, _ in doc if s == section):
            top.append("]")
    lines = {key[1:]: (i if key[0] == "top" else len(top) + i) for key, i in where.items()}
    return "\n".join(top + tail) + "\n", lines


@st.composite
def documents(draw: st.DrawFn, values: st.SearchStrategy[str] | None) -> tuple[str, dict, tuple | None]:
    """A policy of valid keys (values: random literals, or valid ones with exactly one made wrong)."""
    doc: list[tuple[str, list[tuple[str, str]]]] = []
    for section, known in TABLE_KEYS.items():
        keys = draw(st.lists(st.sampled_from(known), unique=True, max_size=4))
        if keys:
            doc.append((section, [(k, draw(values) if values is not None else VALID[k]) for k in keys]))
    for rule, keys in RULE_KEYS.items():
        for i in range(draw(st.integers(0, 2))):
            chosen = draw(
                st.lists(
                    st.sampled_from(keys[1:] if rule == "domain" else keys),
                    min_size=1,
                    unique=True,
                    max_size=3,
                )
            )
            if rule == "domain":
                chosen = ["name", *chosen]
            doc.append(
                (
                    rule,
                    [
                        (k, draw(values) if values is not None else (f'"d{i}"' if k == "name" else VALID[k]))
                        for k in chosen
                    ],
                )
            )
    target = None
    if values is None:
        keys = [(si, ki) for si, (_, pairs) in enumerate(doc) for ki in range(len(pairs))]
        if keys:
            si, ki = draw(st.sampled_from(keys))
            section, pairs = doc[si]
            pairs[ki] = (pairs[ki][0], draw(st.sampled_from(WRONG)))
            n = sum(1 for s, _ in doc[:si] if s == section)
            target = (section, n, pairs[ki][0]) if section in RULE_KEYS else (section, pairs[ki][0])
    if values is None and draw(st.booleans()):
        doc.append(("", [("typo", "1")]))  # a second, independent mistake on its own line
    style = {
        s: draw(st.sampled_from(["header", "dotted", "inline"]))
        for s in ("runs", "churn", "ksmd", *RULE_KEYS)
    }
    text, lines = render(doc, style, draw(st.lists(COMMENTS, min_size=1, max_size=5)))
    return text, lines, target


@FUZZ_DOCS
@given(documents(literals()))
def test_valid_keys_with_any_values(case: tuple[str, dict, tuple | None]) -> None:
    parses_or_refuses(case[0])


@FUZZ_DOCS
@given(documents(None))
def test_one_wrong_value_is_reported_on_its_line(case: tuple[str, dict, tuple | None]) -> None:
    text, lines, target = case
    try:
        parse(text, SRC)
    except PolicyError as exc:
        every = exc.problems
        found = [(ln, msg) for ln, msg in every if "typo" not in msg]
        typo = [ln for ln, msg in every if "unknown key 'typo'" in msg]
    else:
        assert target is None, text
        return
    assert target is not None, text
    key = target[1:] if target[0] == "" else target
    assert len(found) == 1, (text, every)
    ((line, msg),) = found
    assert line == lines[key], (text, key, every)
    assert target[-1] in msg
    if "typo = 1" in text:
        assert typo == [lines[("typo",)]]


@st.composite
def mutated_sample(draw: st.DrawFn) -> str:
    text = (EXAMPLES / "policy.toml").read_text()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["delete", "insert", "dup-line", "swap"]))
        if op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)) :]
        elif op == "insert":
            text = (
                text[:at]
                + draw(st.sampled_from(['"', "[", "]", "=", "\n", "#", "-", "0", "x", "'''", ".", "{"]))
                + text[at:]
            )
        else:
            rows = text.split("\n")
            i, j = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, len(rows) - 1))
            if op == "dup-line":
                rows.insert(j, rows[i])
            else:
                rows[i], rows[j] = rows[j], rows[i]
            text = "\n".join(rows)
    return text


@FUZZ
@given(mutated_sample())
def test_mutated_sample(text: str) -> None:
    parses_or_refuses(text)


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ('[dashboard]\nlisten = "127.0.0.1:x"', "[dashboard] listen: 127.0.0.1:x: the port must be a number"),
        ("[dashboard]\nlisten = 9477", '[dashboard] listen: expected "HOST:PORT", "PORT" or "off", got'),
        ("[dashboard]\ntop_n = 0", "[dashboard] top_n: expected an integer from 1 to 100, got 0"),
    ],
)
def test_dashboard_mistakes_are_said_with_their_line(text: str, wanted: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse(text, "p.toml")
    assert f"p.toml:2: {wanted}" in str(exc.value), str(exc.value)


def test_dashboard_keys() -> None:
    pol = parse('[dashboard]\nlisten = "off"\ntop_n = 3', "p.toml")
    assert (pol.dashboard.listen, pol.dashboard.top_n) == ("off", 3)
