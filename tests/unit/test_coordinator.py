"""The coordinator's pure parts: rule matching, verdicts, churn judgement, stable runs, decisions log."""

from __future__ import annotations

from ksmtrace.coordinator import candidates, decisions
from ksmtrace.coordinator.candidates import ProcFacts, classify, matches
from ksmtrace.coordinator.churn import ChurnJudge
from ksmtrace.coordinator.daemon import _stable
from ksmtrace.coordinator.policy import Churn, Domain, Match, Policy

QEMU = ProcFacts(
    pid=10,
    starttime=1,
    comm="qemu-system-x86",
    exe="/usr/bin/qemu-system-x86_64",
    cgroup="/machine.slice/machine-qemu-1.scope",
    uid=64055,
    self_opted=False,
)


def test_every_given_field_must_match_and_any_value_within_it() -> None:
    assert matches(Match(comm=("qemu-system-x86_64",)), QEMU)  # cut to 15 bytes as the kernel does
    assert matches(Match(exe=("qemu-system-x86_64",)), QEMU)  # basename
    assert matches(Match(exe=("/usr/bin/qemu-system-x86_64",)), QEMU)  # full path
    assert matches(Match(cgroup=("/machine.slice",)), QEMU)  # an ancestor
    assert matches(Match(cgroup=("/machine.slice/",)), QEMU)
    assert not matches(Match(cgroup=("/machine",)), QEMU)  # a prefix is not an ancestor
    assert matches(Match(comm=("x", "qemu-system-x86")), QEMU)
    assert not matches(Match(comm=("qemu-system-x86",), uid=(0,)), QEMU)  # AND across fields
    assert not matches(Match(), QEMU)  # an empty rule names nothing


def test_never_wins_and_says_over_what() -> None:
    pol = Policy(
        mode="enforce",
        candidates=(Match(comm=("qemu-system-x86",), line=3),),
        never=(Match(uid=(64055,), line=7),),
    )
    v = classify(pol, QEMU)
    assert v.role == "never" and v.overruled
    assert "line 7" in v.reason and "line 3" in v.reason
    assert classify(Policy(candidates=pol.candidates), QEMU).role == "candidate"


def test_self_opted_and_domains() -> None:
    me = ProcFacts(11, 1, "redis", "/usr/bin/redis", "/a", 0, True)
    pol = Policy(domains=(Domain("red", Match(cgroup=("/a",))),))
    assert classify(pol, me).role == "self" and classify(pol, me).domain == "red"
    assert classify(Policy(self_opted=False), me).role == "other"
    assert classify(pol, QEMU).domain == candidates.UNDECLARED


def test_stable_runs_are_the_overlap_of_the_last_looks() -> None:
    page = 4096
    looks = [[(0, 16 * page), (64 * page, 72 * page)], [(4 * page, 20 * page), (70 * page, 80 * page)]]
    assert _stable(looks, 2, 4 * page) == [(4 * page, 16 * page)]  # 70..72 is too short
    assert _stable(looks[:1], 2, page) == []  # one look is not two
    assert _stable(looks, 1, page) == looks[-1]


def test_churn_needs_a_window_and_judges_cow_per_merged_page() -> None:
    j = ChurnJudge(Churn(max_cow_per_page_min=1.0, window_s=10, cooldown_s=60, max_rmap_per_merged=64))
    key = (1, 0x1000)
    assert j.judge(key, 0.0, 0.0, 0, 100, 100) is None
    assert j.judge(key, 5.0, 0.0, 500, 100, 100) is None  # too young to judge
    v = j.judge(key, 10.0, 0.0, 1000, 100, 100)  # 1000 COW in 10 s on 100 pages: 60 per page a minute
    assert v is not None and "copy-on-write" in v.reason and v.numbers["cow_per_page_min"] == 60.0
    quiet = (2, 0x1000)
    for t in range(0, 30, 5):
        assert j.judge(quiet, float(t), 0.0, 1, 100, 120) is None
    sparse = (3, 0x1000)
    v = j.judge(sparse, 20.0, 0.0, None, 1, 1000)  # no probe: rmap cost alone
    assert v is not None and "rmap" in v.reason
    j.cool(1, 0x1000, 0x9000, 10.0)
    assert j.cooling(1, 0x8000, 0xA000, 20.0) and not j.cooling(1, 0x9000, 0xA000, 20.0)
    assert not j.cooling(1, 0x8000, 0xA000, 71.0)  # cooldown over


def test_decision_log_round_trip(tmp_path) -> None:
    log = decisions.DecisionLog(tmp_path / "sub" / "d.jsonl")
    d = decisions.Decision(
        "merge", "412 duplicate pages in 7 runs", 5, "qemu", 0x7F00_0000, 0x7F01_0000, True
    )
    log.write(d)
    log.close()
    with open(tmp_path / "sub" / "d.jsonl", "a") as f:
        f.write('{"action": "merge", "rea')  # a line cut by a crash
    assert decisions.read(tmp_path / "sub" / "d.jsonl") == [d]
