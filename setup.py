"""Declares the one compiled module, qrpay._core.

Compiler directives live here, together. QRPAY_CYTHON_DEBUG=1 turns bounds and
wraparound checks back on and writes an annotated HTML next to the source.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("QRPAY_CYTHON_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": False,
}

extensions = [
    Extension(
        "qrpay._core",
        ["src/qrpay/_core.pyx"],
        include_dirs=["src/qrpay"],  # _score_kernel.h
        # -fno-trapping-math lets GCC if-convert the scoring loops (no FP traps
        # are relied on anywhere); results are bit-identical.
        extra_compile_args=["-O3", "-fno-trapping-math"] if not DEBUG else ["-O0", "-g"],
    )
]

setup(
    ext_modules=cythonize(
        extensions, include_path=["src"], compiler_directives=directives, annotate=DEBUG
    )
)
