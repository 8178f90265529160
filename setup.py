"""setuptools glue the pyproject cannot express: the cffi module and bpf/ sources.

The BPF C programs live at the top level (bpf/) and are compiled by BCC at run
time; a wheel carries them as ksmtrace/_bpf so an installed ksmtrace finds them.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "ksmtrace" / "_bpf"
        dest.mkdir(parents=True, exist_ok=True)
        for src in Path("bpf").glob("*.[ch]"):
            (dest / src.name).write_bytes(src.read_bytes())


setup(
    cffi_modules=["native/ksmnative_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithBpf},
)
