"""``ksmtrace estimate``: what KSM would save, per process and per region."""

from __future__ import annotations

from typing import Any

from ksmtrace.scan import Estimate
from ksmtrace.views.fmt import human_bytes, table


def as_json(est: Estimate) -> dict[str, Any]:
    return est.as_dict()


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def text(est: Estimate, exact: bool = False, nregions: int = 10) -> list[str]:
    pg = est.page_size

    def b(pages: float) -> str:
        return human_bytes(pages * pg, exact)

    t = est.totals
    nreg = sum(len(p.regions) for p in est.processes)
    rate = t["bytes_read"] / est.seconds if est.seconds else 0
    out = [
        f"Scanned {len(est.processes)} processes, {nreg} regions, {b(t['present'])} present "
        f"in {est.seconds:.2f}s ({human_bytes(rate)}/s)",
        f"KSM rules: max_page_sharing={est.max_page_sharing} use_zero_pages={int(est.use_zero_pages)}",
    ]
    if est.cost is not None:
        c = est.cost
        out.append(
            f"Scan cost: {c.seconds:.2f}s ({c.cpu_seconds:.2f}s CPU), read {human_bytes(c.bytes_read)}, "
            f"index {human_bytes(c.index_bytes)}, peak RSS {human_bytes(c.peak_rss_bytes)}"
        )
    out.append("")
    rows = []
    for p in sorted(est.processes, key=lambda p: -p.saved_share):
        present = p.total("present")
        rows.append(
            (
                p.pid,
                p.comm[:15],
                b(present),
                b(p.total("zero")),
                b(p.total("ksm")),
                b(p.saved_alone),
                b(p.saved_share),
                _pct(p.saved_share, present),
            )
        )
    out += table(("PID", "COMM", "PRESENT", "ZERO", "KSM-NOW", "SAVE-ALONE", "SAVE-ALL", "SAVE%"), rows)
    out += [
        "",
        f"If all scanned memory merged, KSM would save {b(t['saved'])} "
        f"({_pct(t['saved'], t['present'])} of present):",
        f"  {b(t['saved_within'])} within processes, {b(est.saved_across)} only by merging across them.",
        f"KSM saves {b(t['saved_now'])} of it already ({b(t['ksm'])} in KSM pages).",
        f"{t['distinct']} distinct page contents, {t['dup_groups']} of them duplicated.",
    ]
    if t["volatile_pages"] or t["hash_collisions"]:
        out.append(
            f"{t['volatile_pages']} pages changed or vanished while read; "
            f"{t['hash_collisions']} contents whose first 64 hash bits matched another's told apart."
        )
    regions = sorted((r for p in est.processes for r in p.regions), key=lambda r: -r.saved_share)
    regions = [r for r in regions if r.present]
    if nregions:
        regions = regions[:nregions]
    if regions:
        out.append("")
        rrows = [
            (
                r.pid,
                f"{r.start:x}-{r.end:x}",
                b(r.present),
                b(r.dup_region),
                b(r.dup_process),
                b(r.dup_cross),
                b(r.saved_share),
                _pct(r.saved_share, r.present),
                ("*" if r.mergeable else "") + r.name[-14:],
            )
            for r in regions
        ]
        out += table(
            ("PID", "RANGE", "PRESENT", "DUP-REG", "DUP-PROC", "DUP-XPROC", "SAVE", "SAVE%", "NAME"),
            rrows,
            right=(True, False, True, True, True, True, True, True, False),
        )
        out += [
            "(* already mergeable; DUP-*: pages with a twin in the region / elsewhere in the process /",
            " only in other processes; SAVE: the region's share of the saving when everything merges)",
        ]
    skipped = sum(len(p.skipped) for p in est.processes)
    if skipped:
        out += ["", f"{skipped} mappings skipped: KSM cannot merge them (shared, file-backed, special)."]
    if est.gone or est.denied:
        out.append(f"Left out: {len(est.gone)} processes exited, {len(est.denied)} not readable.")
    return out
