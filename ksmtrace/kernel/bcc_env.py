"""Find kernel headers for BCC and import it, or say exactly what is missing.

BCC compiles its C at run time against kernel headers. It looks in
/lib/modules/$(uname -r)/{build,source}. A custom kernel (this project's test
machines run one) has none there, but tracepoint programs only need the
generic headers, which Debian ships split in two trees:
``linux-headers-X-amd64`` (generated files) and ``linux-headers-X-common``.
``BCC_KERNEL_SOURCE`` alone names one tree, so the generated include dirs of
the other go in as -I flags. Struct layouts from mismatched headers are never
trusted (offsets come from BTF): only macros and basic types are used.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ksmtrace.errors import TracingUnavailable

INSTALL_HINT = "run scripts/install.sh, or: apt-get install python3-bpfcc linux-headers-amd64"


@dataclass(frozen=True)
class HeaderSet:
    source: str  # "running kernel" or "generic headers <version>"
    env: dict[str, str] = field(default_factory=dict)
    cflags: tuple[str, ...] = ()


def _arch_dirname() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _arch_include() -> str:
    return {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def find_headers(
    release: str | None = None,
    modules: Path = Path("/lib/modules"),
    usr_src: Path = Path("/usr/src"),
) -> HeaderSet:
    release = release or platform.release()
    build = modules / release / "build"
    if (build / "include" / "linux").is_dir() or (build / "include" / "generated").is_dir():
        return HeaderSet(source=f"running kernel ({build})")
    arch = _arch_dirname()
    inc = _arch_include()
    candidates = sorted(usr_src.glob(f"linux-headers-*-{arch}"), reverse=True)
    for gen in candidates:
        common = gen.with_name(gen.name[: -len(arch)] + "common")
        if not (common / "include" / "linux").is_dir():
            continue
        if not (gen / "include" / "generated").is_dir():
            continue
        cflags = (
            f"-I{gen}/arch/{inc}/include/generated",
            f"-I{gen}/include",
            f"-I{gen}/arch/{inc}/include/generated/uapi",
            f"-I{gen}/include/generated/uapi",
        )
        return HeaderSet(
            source=f"generic headers {gen.name.removeprefix('linux-headers-')}",
            env={"BCC_KERNEL_SOURCE": str(common)},
            cflags=cflags,
        )
    raise TracingUnavailable(
        f"no kernel headers usable by BCC: none for {release} in {build}, "
        f"and no linux-headers-*-{arch} in {usr_src}; {INSTALL_HINT}"
    )


def import_bcc() -> ModuleType:
    try:
        import bcc  # noqa: PLC0415
    except ImportError as exc:
        raise TracingUnavailable(f"BCC's Python module is not importable ({exc}); {INSTALL_HINT}") from exc
    return bcc


def prepare() -> tuple[ModuleType, HeaderSet]:
    """Import BCC and point it at usable headers; call before BPF(text=...)."""
    headers = find_headers()
    os.environ.update(headers.env)
    return import_bcc(), headers
