"""Builds softprompt_kernels._C: the C++ CPU kernels always; CUDA sources when torch has CUDA.

Build without isolation so the extension compiles against the torch already installed:
    pip install --no-build-isolation -e .
TORCH_CUDA_ARCH_LIST is honoured by torch's cpp_extension (e.g. "9.0" on an H100/H200).
Set SOFTPROMPT_FORCE_CPU=1 to skip the CUDA sources even where torch has CUDA.
Set SOFTPROMPT_SKIP_EXTENSION=1 to install the Python package only, for a second environment of the same
checkout and the same torch build that reuses the extension built in place (the Makefile's vLLM venv).
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a build needs torch installed first
    raise SystemExit(
        "softprompt-kernels builds against an installed torch: install torch first "
        "(CPU machines: pip install torch==2.13.0), then pip install --no-build-isolation -e ."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _want_cuda():
    if os.environ.get("SOFTPROMPT_FORCE_CPU", "0") == "1":
        return False
    # torch.version.cuda is set for CUDA builds of torch; no GPU is needed to compile.
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    # one binding file per op (CPU and, in a CUDA build, CUDA kernels registered per dispatch key) + the kernels
    cpu_sources = ["csrc/module.cpp", "csrc/prefix_attention/ops.cpp", "csrc/prompt_insertion/ops.cpp"] + \
        _sources("csrc/cpu/*.cpp")
    if _want_cuda():
        cuda_sources = _sources("csrc/cuda/**/*.cu")
        return CUDAExtension(
            "softprompt_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("SOFTPROMPT_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "softprompt_kernels._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[] if os.environ.get("SOFTPROMPT_SKIP_EXTENSION", "0") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
