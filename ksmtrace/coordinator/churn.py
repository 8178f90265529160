"""When a merged range costs more than it saves, and when it may come back.

Two rules, thresholds from the policy's ``[churn]``:

- copy-on-write: the range's KSM COW faults (exact, from the fault probe)
  per merged page per minute, over the policy's window. Each such fault is a
  page copied, a page no longer shared, and work for ksmd to merge it again:
  a range whose pages are broken about once a minute or more gives back its
  saving as fast as ksmd makes it.
- rmap cost: ksmd keeps an rmap item (64 bytes) per page it scans in a
  mergeable area, merged or not; the kernel's KSM documentation calls
  merging worth it while rmap items stay under 64 per merged page. A range
  old enough to have been scanned (one window) is judged on its present
  pages per merged page.

Hysteresis: a range is judged only once it is a full window old, and an
unmerged range stays out for the cooldown (the caller keeps it out of its
choices), so a range does not flap between the two states.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ksmtrace.coordinator.policy import Churn


@dataclass(frozen=True)
class ChurnVerdict:
    reason: str
    numbers: dict[str, float]


class ChurnJudge:
    def __init__(self, rules: Churn) -> None:
        self.rules = rules
        self._cow: dict[tuple[int, int], deque[tuple[float, int]]] = {}
        self._cooling: dict[tuple[int, int, int], float] = {}  # (pid, start, end) -> until

    def judge(
        self,
        key: tuple[int, int],
        now: float,
        since: float,
        cow_total: int | None,
        merged_pages: int,
        present_pages: int,
    ) -> ChurnVerdict | None:
        """A reason to unmerge the range ``key`` (pid, start), or None to keep it.

        ``cow_total``: the fault probe's cumulative KSM COW count for the
        range (None without the probe); ``merged_pages``: its pages that are
        KSM pages now; ``present_pages``: its pages in memory.
        """
        r = self.rules
        hist = self._cow.setdefault(key, deque())
        if cow_total is not None:
            hist.append((now, cow_total))
            while len(hist) > 2 and hist[1][0] <= now - r.window_s:
                hist.popleft()
        if now - since < r.window_s:
            return None  # too young to judge: ksmd may not have scanned it yet
        if len(hist) >= 2 and hist[-1][0] - hist[0][0] >= r.window_s / 2:
            (t0, c0), (t1, c1) = hist[0], hist[-1]
            per_min = (c1 - c0) * 60.0 / (t1 - t0)
            per_page = per_min / max(1, merged_pages)
            if per_page > r.max_cow_per_page_min:
                return ChurnVerdict(
                    f"{per_min:.0f} KSM copy-on-write faults a minute on {merged_pages} merged pages "
                    f"({per_page:.2f} per page per minute, limit {r.max_cow_per_page_min:g}): "
                    "its writes undo the merging as fast as ksmd does it",
                    {
                        "cow_per_min": round(per_min, 1),
                        "merged_pages": merged_pages,
                        "cow_per_page_min": round(per_page, 3),
                    },
                )
        ratio = present_pages / max(1, merged_pages)
        if ratio > r.max_rmap_per_merged:
            return ChurnVerdict(
                f"{merged_pages} of its {present_pages} pages merged after {now - since:.0f} s: "
                f"{ratio:.0f} rmap items per merged page, over the rule of {r.max_rmap_per_merged:g}",
                {
                    "merged_pages": merged_pages,
                    "present_pages": present_pages,
                    "rmap_per_merged": round(ratio, 1),
                },
            )
        return None

    def cool(self, pid: int, start: int, end: int, now: float) -> None:
        self._cow.pop((pid, start), None)
        self._cooling[(pid, start, end)] = now + self.rules.cooldown_s

    def cooling(self, pid: int, start: int, end: int, now: float) -> bool:
        """Does [start, end) of pid overlap a range still in its cooldown?"""
        for (p, s, e), until in list(self._cooling.items()):
            if until <= now:
                del self._cooling[(p, s, e)]
            elif p == pid and s < end and start < e:
                return True
        return False

    def forget(self, pids: set[int]) -> None:
        self._cow = {k: v for k, v in self._cow.items() if k[0] not in pids}
        self._cooling = {k: v for k, v in self._cooling.items() if k[0] not in pids}
