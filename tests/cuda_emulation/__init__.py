"""The CUDA kernels compiled for the CPU with a SIMT emulator (see simt_emulation.h).

``load()`` builds them once per machine with torch's cpp_extension (about a minute) and
returns the module. Its ``forward`` is the CUDA binding's own dispatch (csrc/cuda_forward.h:
decode for Lq <= 16, prefill above, layouts, workspace) on CPU tensors; tests compare its
outputs with the float64 oracle, so the kernels' logic and the dispatch around them are
checked on every CI run although no GPU is present.
"""
import os

import torch.utils.cpp_extension as cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
_module = None


def load():
    global _module
    if _module is None:
        _module = cpp_extension.load(
            name="softprompt_simt_emulation",
            sources=[os.path.join(HERE, "emulated_ops.cpp")],
            extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
            extra_cflags=["-O2", "-std=c++20", "-DSOFTPROMPT_SIMT_EMULATION", "-Wno-unknown-pragmas"],
            extra_ldflags=["-lpthread"],
            verbose=False,
        )
    return _module
