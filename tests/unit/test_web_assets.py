"""The web page's assets: all there, all in the package build, all pinned, none from elsewhere.

The build check of the page: a file index.html names that is missing, or
that the wheel would leave out (pyproject.toml package-data, matched the
way setuptools matches it), fails here; so does a vendored library whose
bytes differ from the sha256 pinned in ksmtrace/web/vendor/pins.json, and
any asset that names another host (the page must work offline, and make no
request off the host).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import tomllib

from ksmtrace.live import server

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "ksmtrace"
WEB = PKG / "web"
PINS = json.loads((WEB / "vendor" / "pins.json").read_text())
LICENCES = {"LICENSE", "LICENCE", "LICENSE.md", "COPYING"}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append((tag, value))


def index_refs() -> list[tuple[str, str]]:
    p = _Refs()
    p.feed((WEB / "index.html").read_text())
    return p.refs


def packaged(rel: str) -> bool:
    """Whether setuptools' build_py would put ksmtrace/REL in the wheel: it
    globs each package-data pattern (recursively) under the package's directory."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {}).get("ksmtrace", [])
    found = {Path(f) for pat in patterns for f in glob.glob(str(PKG / pat), recursive=True)}
    return PKG / rel in found


def asset_files() -> list[Path]:
    return sorted(p for p in WEB.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_every_file_the_page_names_exists_and_is_packaged() -> None:
    refs = index_refs()
    static = [v for _, v in refs if v.startswith("static/")]
    # The page's own code and the charting library, JS and CSS.
    for want in ("static/app.js", "static/style.css", "static/vendor/uplot/uPlot.iife.min.js"):
        assert want in static, refs
    assert "static/vendor/uplot/uPlot.min.css" in static, refs
    for ref in static:
        rel = ref[len("static/") :]
        assert (WEB / rel).is_file(), f"index.html names {ref}, and ksmtrace/web/{rel} is missing"
        assert packaged(f"web/{rel}"), f"ksmtrace/web/{rel} is not in pyproject.toml's package-data"
    assert packaged("web/index.html")
    for _, ref in refs:
        if ref.startswith("api/"):
            assert "/" + ref in server.ROUTES, f"index.html links {ref}, which the server does not serve"
        else:
            assert ref.startswith(("static/", "data:")), f"index.html names {ref}: not served by the daemon"


def test_every_asset_is_packaged() -> None:
    missing = [str(p.relative_to(PKG)) for p in asset_files() if not packaged(str(p.relative_to(PKG)))]
    assert not missing, f"left out of the wheel by pyproject.toml's package-data: {missing}"


def test_the_api_paths_the_script_fetches_are_served() -> None:
    js = (WEB / "app.js").read_text()
    paths = set(re.findall(r"""get\(\s*["'](api/[a-z_]+)""", js))
    assert paths >= {"api/state", "api/history", "api/decisions"}, paths
    for p in paths:
        assert "/" + p in server.ROUTES, p


def test_vendored_files_match_their_pins() -> None:
    for name, pin in PINS.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", pin["version"]), pin  # an exact version, not a range
        assert pin["licence"] and "LICENSE" in pin["files"], f"{name} is vendored without its licence"
        for fname, f in pin["files"].items():
            path = WEB / "vendor" / name / fname
            assert path.is_file(), f"{path} missing: scripts/vendor_web.py fetches it"
            got = hashlib.sha256(path.read_bytes()).hexdigest()
            assert got == f["sha256"], f"{path}: sha256 {got}, pinned {f['sha256']} ({name} {pin['version']})"
    # Nothing vendored that is not pinned.
    for p in (WEB / "vendor").rglob("*"):
        if p.is_file() and p.name != "pins.json":
            name, fname = p.relative_to(WEB / "vendor").parts[0], p.name
            assert fname in PINS.get(name, {}).get("files", {}), f"{p} is vendored without a pin"


def _vendor_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("vendor_web", ROOT / "scripts" / "vendor_web.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("vendor_web", mod)
    spec.loader.exec_module(mod)
    return mod


def test_vendor_script_check_passes_and_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _vendor_script()
    assert mod.check(PINS) == []
    # The same check on a copy with one byte changed and one file gone.
    for name, pin in PINS.items():
        (tmp_path / name).mkdir()
        for fname in pin["files"]:
            (tmp_path / name / fname).write_bytes((WEB / "vendor" / name / fname).read_bytes())
    js = tmp_path / "uplot" / "uPlot.iife.min.js"
    js.write_bytes(js.read_bytes() + b"\n")
    (tmp_path / "uplot" / "LICENSE").unlink()
    monkeypatch.setattr(mod, "VENDOR", tmp_path)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    bad = mod.check(PINS)
    assert any("uPlot.iife.min.js: sha256 differs" in b for b in bad), bad
    assert any("LICENSE: missing" in b for b in bad), bad


URL = re.compile(r"""(?:https?|wss?|ftp):/{2}|(?:["'(=]\s*)/{2}[a-z0-9.-]+\.[a-z]{2,}""", re.IGNORECASE)
BANNER = re.compile(r"/\*!.*?\*/", re.DOTALL)  # a minified library's licence banner


def external_refs(text: str) -> list[str]:
    """Strings in an asset that name another host (licence banners aside)."""
    return [m.group(0) for m in URL.finditer(BANNER.sub("", text))]


def test_external_ref_finder_finds_them() -> None:
    assert external_refs('<script src="https://cdn.example.com/x.js">') == ["https://"]
    assert external_refs("@import url(//fonts.example.org/a.css);")
    assert external_refs('fetch("wss://x.example")')
    assert not external_refs("/*! https://github.com/leeoniya/uPlot (v1.6.32) */ var a = 1; // a comment")
    assert not external_refs('fetch("api/state"); x = a // b')


def test_no_asset_names_another_host() -> None:
    found = {}
    for p in asset_files():
        if p.name in LICENCES or p.suffix not in (".html", ".js", ".css", ".json"):
            continue
        refs = external_refs(p.read_text())
        if p.name == "pins.json":
            refs = []  # hashes and versions only; checked to hold no URL below
            assert "://" not in p.read_text()
        if refs:
            found[str(p.relative_to(WEB))] = refs
    assert not found, f"assets that would make the browser ask another host: {found}"


def test_page_forbids_other_hosts_itself() -> None:
    """Besides the server's header, the page carries its own policy: only 'self' for scripts and fetches."""
    html = (WEB / "index.html").read_text()
    csp = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]+)"', html)
    assert csp, "index.html has no Content-Security-Policy"
    rules = dict(r.strip().split(" ", 1) for r in csp.group(1).split(";") if r.strip())
    assert rules["default-src"] == "'none'"
    assert rules["script-src"] == "'self'" and rules["connect-src"] == "'self'"
