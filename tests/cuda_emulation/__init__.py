"""The CUDA kernels compiled for the CPU with a SIMT emulator (see simt_emulation.h).

``load()`` builds them once per machine with torch's cpp_extension (about a minute) and returns the module.
``forward`` runs the CUDA kernel's own dispatch (csrc/prefix_attention/cuda_forward.h: decode for Lq <= 16,
prefill above, layouts, workspace) on CPU tensors, as the op ``softprompt_emulation::cuda_forward``: the
contract's arguments of ``prefix_attention_fwd`` (read by name in C++, as on a GPU) plus ``num_splits`` and
``num_sms``. Tests compare its outputs with the float64 oracle, so the kernels' logic and the dispatch around them
are checked on every CI run although no GPU is present.
"""
import os

import torch
import torch.utils.cpp_extension as cpp_extension

from softprompt_kernels.ops.contract import Arg
from softprompt_kernels.ops.prefix_attention.contract import CONTRACT

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EMULATION = (Arg("num_splits", "int", "> 0: the decode plan's split count", default=0),
             Arg("num_sms", "int", "the emulated part's SM count", default=4))
_module = None


class Emulated:
    """The emulated CUDA forward (``forward``) and the decode plan of the compiled module."""

    def __init__(self, module):
        self.decode_plan = module.decode_plan
        self.decode_max_queries = module.decode_max_queries

    @staticmethod
    def forward(q, k, v, prefix_k, prefix_v, **arguments):
        """(out, lse) of the CUDA forward; arguments by their contract names (scale defaults to D ** -0.5)."""
        arguments.setdefault("scale", q.shape[-1] ** -0.5)
        values = dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, **arguments)
        return torch.ops.softprompt_emulation.cuda_forward(*CONTRACT.positional(values, trailing=EMULATION))


def load() -> Emulated:
    global _module
    if _module is None:
        module = cpp_extension.load(
            name="softprompt_simt_emulation",
            sources=[os.path.join(HERE, "emulated_ops.cpp")],
            extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
            extra_cflags=["-O2", "-std=c++20", "-DSOFTPROMPT_SIMT_EMULATION", "-Wno-unknown-pragmas"],
            extra_ldflags=["-lpthread"],
            verbose=False,
        )
        torch.library.define("softprompt_emulation::cuda_forward", CONTRACT.schema(trailing=EMULATION))
        _module = Emulated(module)
    return _module
