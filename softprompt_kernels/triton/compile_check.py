"""Ahead-of-time GPU compilation of every Triton kernel configuration, on a machine without a GPU.

The interpreter accepts programs the GPU compiler rejects; this closes that gap. Each kernel
is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` in every
configuration its autotuner may pick, and the cubin is read with the cuobjdump bundled with
Triton (``--dump-resource-usage``). The check fails on a compile error, on local memory or a
stack frame (spills), on shared memory over the target's limit, and when an sm_90 attention
kernel in bf16/fp16 with head dim <= 128 does not use ``wgmma`` (float32 tiles and head dim 256
run on mma.sync: see forward.FWD_SPACE). One line is printed per kernel and configuration.

    python -m softprompt_kernels.triton.compile_check [--arch 90,80] [--jobs N]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# Shared memory one block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# head dim -> padded BLOCK_D; 80 stands for every head dim padded to 128 (96 compiles identically)
HEAD_DIMS = {16: 16, 32: 32, 64: 64, 80: 128, 128: 128, 256: 256}


@dataclass
class Job:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    blocks: Dict[str, int]
    num_warps: int
    num_stages: int
    flags: Dict[str, object] = field(default_factory=dict)

    def label(self) -> str:
        blocks = " ".join(f"{k}={v}" for k, v in self.blocks.items())
        variant = "-" if "CAUSAL" not in self.flags else ("causal" if self.flags["CAUSAL"] else "full") + (
            "/plain" if self.flags.get("HAS_PADDING", True) is False else "/all")
        return (f"{self.kernel:<10} {variant:<12} sm_{self.arch} {self.dtype:<4} D={self.head_dim:<3} {blocks:<22} "
                f"warps={self.num_warps} stages={self.num_stages}")


_POINTERS = {
    "fwd": {"Q": "T", "K": "T", "V": "T", "PK": "T", "PV": "T", "PROMPT_IDS": "*i64", "PREFIX_LENS": "*i64",
            "PADDING": "*u8", "SINKS": "*fp32", "PREFIX_OFFSETS": "*i64", "OUT": "T", "LSE": "*fp32"},
    "bwd_kv": {"Q": "T", "K": "T", "V": "T", "PADDING": "*u8", "DO": "T", "LSE": "*fp32", "DELTA": "*fp32",
               "DK": "T", "DV": "T"},
    "bwd_prefix": {"Q": "T", "PK": "T", "PV": "T", "PROMPT_IDS": "*i64", "PREFIX_LENS": "*i64",
                   "PREFIX_OFFSETS": "*i64", "DO": "T",
                   "LSE": "*fp32", "DELTA": "*fp32", "DPK": "*fp32", "DPV": "*fp32"},
    "bwd_dq": {"Q": "T", "K": "T", "V": "T", "PK": "T", "PV": "T", "PROMPT_IDS": "*i64", "PREFIX_LENS": "*i64",
               "PADDING": "*u8", "PREFIX_OFFSETS": "*i64", "DO": "T", "LSE": "*fp32", "DELTA": "*fp32", "DQ": "T"},
    "delta": {"OUT": "T", "DO": "T", "GRAD_LSE": "*fp32", "DELTA": "*fp32"},
    "reduce": {"PARTIAL": "*fp32", "PROMPT_IDS": "*i64", "PREFIX_LENS": "*i64", "OUT": "T"},
}
_FLOAT_SCALARS = {"scale", "scale_log2", "cap_scale", "cap_log2"}
_WGMMA_KERNELS = {"fwd", "bwd_kv", "bwd_prefix", "bwd_dq"}


def _kernels():
    from . import backward, forward

    return {"fwd": forward.prefix_attention_fwd_kernel, "bwd_kv": backward.prefix_attention_bwd_kv_kernel,
            "bwd_prefix": backward.prefix_attention_bwd_prefix_kernel,
            "bwd_dq": backward.prefix_attention_bwd_dq_kernel, "delta": backward.delta_kernel,
            "reduce": backward.reduce_prefix_grads_kernel}


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # unwrap the autotuner
        kernel = kernel.fn
    return kernel


def jobs_for(archs: List[int], dtypes: List[str]) -> List[Job]:
    from .backward import BWD_SPACE, DELTA_BLOCK, DQ_SPACE, PREFIX_SPACE, reduce_block
    from .common import ALL_ARCHS, FP32_HEAD_BLOCKS, HALF_DTYPES
    from .forward import FWD_SPACE

    spaces = {"fwd": FWD_SPACE, "bwd_kv": BWD_SPACE, "bwd_prefix": PREFIX_SPACE, "bwd_dq": DQ_SPACE}
    # sliding window, soft-capping and sinks on: the heaviest programs (docs/DESIGN.md section 2)
    attention_flags = dict(HAS_IDS=True, HAS_LENS=True, HAS_PADDING=True, CAUSAL=True, HAS_WINDOW=True,
                           HAS_SOFTCAP=True, HAS_SINKS=True, HAS_OFFSETS=True)
    jobs = []
    for arch in archs:
        for dtype in dtypes:
            for head_dim, block_d in HEAD_DIMS.items():
                common = dict(BLOCK_D=block_d, EVEN_D=block_d == head_dim,
                              DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
                for kernel, space in spaces.items():
                    for c in space[block_d]:
                        if arch not in c.get("archs", ALL_ARCHS) or dtype not in c.get("dtypes", HALF_DTYPES):
                            continue  # the autotuner never picks it for this architecture / dtype
                        when = c.get("when", {})
                        if when.get("EVEN_D", common["EVEN_D"]) != common["EVEN_D"]:
                            continue
                        blocks = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages", "archs", "dtypes",
                                                                         "when")}
                        # the heaviest variant the config may run with: every optional input present,
                        # prefix gradients by atomics; causal and full attention are different programs
                        flags = dict(attention_flags, DETERMINISTIC=False, **common)
                        flags.update(when)
                        causal_values = (when["CAUSAL"],) if "CAUSAL" in when else (
                            (True,) if kernel == "bwd_prefix" else (True, False))
                        for causal in causal_values:
                            jobs.append(Job(kernel, arch, dtype, head_dim, blocks, c["num_warps"], c["num_stages"],
                                            dict(flags, CAUSAL=causal)))
                if dtype == "fp32" and block_d not in FP32_HEAD_BLOCKS:
                    continue  # the backend refuses float32 at this head dim
                jobs.append(Job("delta", arch, dtype, head_dim, {"BLOCK_M": DELTA_BLOCK["BLOCK_M"]},
                                DELTA_BLOCK["num_warps"], 1, dict(HAS_GRAD_LSE=True, BLOCK_D=block_d)))
                jobs.append(Job("reduce", arch, dtype, head_dim, {"BLOCK_S": reduce_block(block_d)}, 4, 1,
                                dict(HAS_IDS=True, HAS_LENS=True, BLOCK_D=block_d)))
    return jobs


def _signature(fn, kernel: str, dtype: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    pointers = _POINTERS[kernel]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = f"*{dtype}" if pointers[name] == "T" else pointers[name]
        else:
            # torch.compile's launcher passes Python floats as fp64 (the eager one as fp32); the
            # kernels cast them on entry, so fp64 here checks the stricter of the two typings
            sig[name] = "fp64" if name in _FLOAT_SCALARS else "i32"
    return sig


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        usage[key] = int(match.group(1)) if match else 0
    return usage


def compile_job(job: Job) -> Tuple[Job, Optional[str], str]:
    """Returns (job, failure or None, summary line)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(_kernels()[job.kernel])
    constexprs = {k: v for k, v in dict(job.flags, **job.blocks).items() if k in fn.arg_names}
    try:
        src = ASTSource(fn, _signature(fn, job.kernel, job.dtype, constexprs), constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                  options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
    except Exception as exc:  # noqa: BLE001 - any compiler failure fails the check
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return job, f"compile error: {first}", f"{job.label()}  FAILED to compile"
    usage = resource_usage(compiled.asm["cubin"])
    shared = max(usage["SHARED"], int(compiled.metadata.shared))
    wgmma = "wgmma" in compiled.asm["ptx"]
    line = (f"{job.label()}  regs={usage['REG']:<3} stack={usage['STACK']:<4} local={usage['LOCAL']:<4} "
            f"shared={shared:<6} wgmma={'yes' if wgmma else 'no'}")
    problems = []
    if usage["LOCAL"] or usage["STACK"]:
        problems.append(f"spills or local memory (stack {usage['STACK']}, local {usage['LOCAL']})")
    if shared > SHARED_LIMIT.get(job.arch, 101376):
        problems.append(f"shared memory {shared} > {SHARED_LIMIT.get(job.arch)}")
    if job.arch >= 90 and job.kernel in _WGMMA_KERNELS and job.dtype != "fp32" and job.head_dim <= 128 \
            and not wgmma:
        problems.append("no wgmma in the sm_90 attention kernel")
    return job, ("; ".join(problems) or None), line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma separated")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    from .common import interpreting

    if interpreting():
        parser.error("unset TRITON_INTERPRET: the kernels were defined for the interpreter, not the GPU compiler")
    jobs = jobs_for([int(a) for a in args.arch.split(",")], args.dtypes.split(","))
    failures = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for job, failure, line in pool.map(compile_job, jobs):
            print(line + (f"  <-- {failure}" if failure else ""), flush=True)
            if failure:
                failures.append((job, failure))
    print(f"\n{len(jobs)} kernel configurations compiled, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
