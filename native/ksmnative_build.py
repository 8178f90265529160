"""cffi build of ksmtrace._native from the C sources in native/.

The C lives in .c/.h files; this script only reads them. The cdef is the part
of ksmnative.h between the CDEF markers, so the header is the single source of
truth for the interface.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))


def _cdef(header: Path) -> str:
    text = header.read_text()
    body = text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    return body


ffibuilder = FFI()
ffibuilder.cdef(_cdef(HERE / "ksmnative.h"))
ffibuilder.set_source(
    "ksmtrace._native",
    '#include "ksmnative.h"',
    sources=SOURCES,
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
