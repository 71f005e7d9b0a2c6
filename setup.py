"""Builds galatea/kernels' native library (everything else is in pyproject.toml).

The library is plain C++ loaded with ctypes (no Python or torch headers: it builds in seconds
with the machine's g++). Each instruction-set file is compiled with its own -m flags and the
CPU is asked at run time which one to call, so the same build runs on any x86-64 CPU; nothing
is compiled for the build machine's CPU (-march=native). If the build fails (no compiler, an
old one, another architecture), the install still succeeds: Galatea then runs its torch
fallback and `galatea inspect` / `galatea bench` say why.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = Path("galatea/kernels/csrc")
COMMON = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-pthread", "-Wall",
          "-Wno-maybe-uninitialized"]  # GCC 12 warns on every AVX-512 intrinsic (its _mm512_undefined)
ISA_FLAGS = {
    "matmul_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"],
    "matmul_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
}
FAILED = Path("galatea/kernels/BUILD_FAILED")  # read at run time to say why the fallback runs


class BuildNative(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name))
        try:
            if platform.machine().lower() not in ("x86_64", "amd64"):
                raise RuntimeError(f"the native kernels are written for x86-64, this is {platform.machine()}")
            objects = []
            for src in ext.sources:
                flags = COMMON + ISA_FLAGS.get(Path(src).name, [])
                try:
                    objects += self.compiler.compile([src], output_dir=self.build_temp, extra_postargs=flags,
                                                     depends=[str(p) for p in CSRC.glob("*.h")])
                except Exception as e:
                    raise RuntimeError(f"{self.compiler.compiler_so[0]} could not compile {Path(src).name}; "
                                       "install g++ 8 or newer and run `pip install -e .` again") from e
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.compiler.link_shared_object(objects, str(out), extra_postargs=["-pthread"], target_lang="c++")
            except Exception as e:
                raise RuntimeError(f"linking the library failed ({type(e).__name__}); install g++ and run "
                                   "`pip install -e .` again") from e
        except Exception as e:  # a failed build must not fail the install
            message = str(e)
            print(f"galatea: native kernels not built ({message}); the torch fallback will run", file=sys.stderr)
            for root in (self.build_lib, "."):  # the build folder, and the source tree (in-place builds)
                (Path(root) / self.get_ext_filename(ext.name)).unlink(missing_ok=True)  # never load an old build
                if (Path(root) / FAILED).parent.is_dir():
                    (Path(root) / FAILED).write_text(message + "\n", encoding="utf-8")
            return
        for root in (self.build_lib, "."):
            (Path(root) / FAILED).unlink(missing_ok=True)

    def copy_extensions_to_source(self) -> None:
        """In-place builds copy what was built into the source tree: only what was."""
        built = [e for e in self.extensions if (Path(self.build_lib) / self.get_ext_filename(e.name)).exists()]
        self.extensions, every = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = every


setup(
    ext_modules=[Extension("galatea.kernels._gx", sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))])],
    cmdclass={"build_ext": BuildNative},
)
