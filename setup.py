"""Builds the C kernels (moe_local.formats._cpu) at install: `pip install -e .` compiles csrc/*.c.

Plain C against the CPython API only, so any C compiler (gcc, clang) builds it in seconds; every
ISA file carries its own `#pragma GCC target`, so one build runs on any x86-64 and picks its
kernels by cpuid at import. Without a compiler the install fails loudly (the package metadata is
in pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "moe_local.formats._cpu",
            sources=["csrc/_cpu.c", "csrc/pool.c", "csrc/kern_portable.c", "csrc/kern_avx2.c", "csrc/kern_avx512.c"],
            depends=["csrc/kern.h", "csrc/kern_generic.h", "csrc/pool.h"],
            extra_compile_args=["-O3", "-std=c11", "-fno-math-errno"],
            extra_link_args=["-pthread"],
        )
    ]
)
