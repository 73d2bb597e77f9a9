"""Build of the compiled CPU kernels ``fastfm._C`` (all package metadata lives in pyproject.toml).

Only pybind11 and a C++17 compiler are needed: the extension takes raw data pointers from the
Python wrapper (kernels/cpu.py) and never links against libtorch, so an isolated build needs no torch.
"""

from __future__ import annotations

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

compile_args: list[str] = []
link_args: list[str] = []
if sys.platform.startswith("linux"):
    # No -march=native (the wheel must run on any x86-64: the hot loops carry their own AVX2/AVX-512
    # clones) and no -ffast-math (it would change the noise). -ffp-contract=off keeps every clone
    # bitwise identical; -fno-trapping-math / -fno-math-errno only let GCC if-convert and vectorise
    # (IEEE results are unchanged).
    compile_args += ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    link_args += ["-fopenmp"]
elif sys.platform == "win32":
    compile_args += ["/O2", "/openmp"]
else:  # macOS clang: no OpenMP by default; the kernels then run on one thread
    compile_args += ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]

ext_modules = [
    Pybind11Extension(
        "fastfm._C",
        ["csrc/fastfm_ops.cpp"],
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
