#!/usr/bin/env python3
"""Fetch the web page's vendored JavaScript again, at its pinned version, and check it.

The page's charting library (uPlot) comes from the npm registry and is kept
inside the package (ksmtrace/web/vendor/NAME/), so that the daemon serves it
itself and the browser asks nothing of any other host. What is pinned, the
version and the sha256 of the registry's tarball and of every file taken
from it, is in ksmtrace/web/vendor/pins.json: this script and
tests/unit/test_web_assets.py both read it, so a file that differs from
the pin fails the tests, and a re-fetch that differs fails here before it
replaces anything.

Usage:
  scripts/vendor_web.py           fetch with `npm pack`, check, copy into ksmtrace/web/vendor/
  scripts/vendor_web.py --check   only check the vendored files against the pins (offline)

To move to another version: change "version" in pins.json, run with --update
(which prints the new hashes instead of failing on them), read the library's
changelog and licence, and commit pins.json with the files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "ksmtrace" / "web" / "vendor"
PINS = VENDOR / "pins.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(pins: dict) -> list[str]:
    """Differences between the vendored files and their pins (empty: all good)."""
    bad = []
    for name, pin in pins.items():
        for fname, f in pin["files"].items():
            path = VENDOR / name / fname
            if not path.is_file():
                bad.append(f"{path.relative_to(ROOT)}: missing")
            elif sha256(path.read_bytes()) != f["sha256"]:
                bad.append(
                    f"{path.relative_to(ROOT)}: sha256 differs from the pin of {name} {pin['version']}"
                )
    return bad


def fetch(name: str, pin: dict, update: bool) -> list[str]:
    """npm pack the pinned version, check it, copy its files; the sentences of what differed."""
    spec = f"{pin['npm']}@{pin['version']}"
    with tempfile.TemporaryDirectory(prefix="ksmtrace-vendor-") as tmp:
        # npm checks the tarball against the registry's integrity field; the
        # sha256 pinned here also catches a registry that changed its mind.
        out = subprocess.run(
            ["npm", "pack", spec, "--json", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            check=True,
        )
        tgz = Path(tmp) / json.loads(out.stdout)[0]["filename"]
        data = tgz.read_bytes()
        problems = []
        if sha256(data) != pin["tarball_sha256"]:
            problems.append(f"{spec} tarball sha256 {sha256(data)} (pinned {pin['tarball_sha256']})")
        files = {}
        with tarfile.open(tgz) as tar:
            for fname, f in pin["files"].items():
                member = tar.extractfile(f["from"])
                if member is None:
                    problems.append(f"{spec}: no {f['from']} in the tarball")
                    continue
                files[fname] = member.read()
                if sha256(files[fname]) != f["sha256"]:
                    problems.append(
                        f"{spec} {f['from']} sha256 {sha256(files[fname])} (pinned {f['sha256']})"
                    )
        if problems and not update:
            return problems
        dest = VENDOR / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for fname, body in files.items():
            (dest / fname).write_bytes(body)
        if update:
            pin["tarball_sha256"] = sha256(data)
            for fname, body in files.items():
                pin["files"][fname]["sha256"] = sha256(body)
        return []


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the vendored files (no network)")
    ap.add_argument("--update", action="store_true", help="take new hashes into pins.json (a version change)")
    args = ap.parse_args(argv)
    pins = json.loads(PINS.read_text())
    if not args.check:
        for name, pin in pins.items():
            problems = fetch(name, pin, args.update)
            if problems:
                print("vendor_web: refusing, the registry's files differ from the pins:", file=sys.stderr)
                for p in problems:
                    print(f"  {p}", file=sys.stderr)
                return 1
        if args.update:
            PINS.write_text(json.dumps(pins, indent=2) + "\n")
    bad = check(pins)
    for b in bad:
        print(f"vendor_web: {b}", file=sys.stderr)
    if not bad:
        print(
            "vendor_web: "
            + ", ".join(f"{n} {p['version']}" for n, p in pins.items())
            + ": files match the pins"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
