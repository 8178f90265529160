"""Header discovery for BCC on fixture directory trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmtrace.errors import TracingUnavailable
from ksmtrace.kernel import bcc_env


def test_running_kernel_headers_preferred(tmp_path: Path) -> None:
    (tmp_path / "mod" / "6.18.1" / "build" / "include" / "linux").mkdir(parents=True)
    h = bcc_env.find_headers("6.18.1", tmp_path / "mod", tmp_path / "src")
    assert h.source.startswith("running kernel") and not h.env and not h.cflags


def test_debian_split_generic_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bcc_env, "_arch_dirname", lambda: "amd64")
    monkeypatch.setattr(bcc_env, "_arch_include", lambda: "x86")
    src = tmp_path / "src"
    (src / "linux-headers-6.1.0-9-common" / "include" / "linux").mkdir(parents=True)
    (src / "linux-headers-6.1.0-9-amd64" / "include" / "generated").mkdir(parents=True)
    h = bcc_env.find_headers("6.18.1", tmp_path / "mod", src)
    assert h.env == {"BCC_KERNEL_SOURCE": str(src / "linux-headers-6.1.0-9-common")}
    assert f"-I{src}/linux-headers-6.1.0-9-amd64/include" in h.cflags


def test_no_headers_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(TracingUnavailable, match="linux-headers"):
        bcc_env.find_headers("6.18.1", tmp_path / "mod", tmp_path / "src")
