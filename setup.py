"""Packaging glue that pyproject.toml cannot express.

1. `kernels/` is installed as `wz_kernels` (never as a top-level `kernels`, which is the name of a
   Hugging Face package that transformers probes for).
2. The optional CUDA extension `wz_kernels._C` is built from `csrc/` only where a CUDA build of
   torch and a CUDA toolchain are present. Build isolation hides torch, so on a GPU machine use
   `pip install --no-build-isolation -e .` to get it; everywhere else it is skipped cleanly and the
   Triton / torch paths are used.
"""

import glob
import os

from setuptools import find_packages, setup

packages = ["wz_kernels"] + [f"wz_kernels.{p}" for p in find_packages("kernels")]
packages += find_packages(include=["wz_engine", "wz_engine.*"])


def cuda_extensions():
    if os.environ.get("WZ_BUILD_CUDA", "1") == "0":
        return [], {}
    bindings = sorted(glob.glob("csrc/**/*_binding.cpp", recursive=True))
    if not bindings:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("wz-engine: torch not importable at build time; skipping the CUDA extension")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("wz-engine: no CUDA torch / CUDA toolchain; skipping the CUDA extension")
        return [], {}
    sources = bindings + sorted(glob.glob("csrc/**/*.cu", recursive=True))
    ext = CUDAExtension(
        name="wz_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=packages,
    package_dir={"wz_kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
