"""Peak memory of one call, on CPU and CUDA (used by the benchmarks and the example programs)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silences fd 2: kineto prints a line on every profiler start and stop."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak of bytes allocated minus freed through the CPU allocator during one call.

    ``torch.profiler`` with ``profile_memory=True`` records each tensor allocation and free
    (``[memory]`` events with signed sizes; backward's show up too), so a running sum in
    time order gives the peak live memory the call added on top of what existed before
    it: temporaries, saved activations, outputs and gradients; not the inputs. Memory a
    kernel takes outside torch's allocator (a ``std::vector`` workspace) is not seen.
    Returns None when this torch's profiler does not expose the events."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    sizes = sorted((e.start_ns(), e.nbytes()) for e in events
                   if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in sizes:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak memory one call allocates above what was allocated before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
    allocation at the start. CPU: see :func:`_cpu_peak_bytes`. Run outside the timed loop
    (the profiler slows every op down)."""
    device = torch.device(device)
    if device.type != "cuda":
        peak = _cpu_peak_bytes(fn)
        return None if peak is None else peak / 2**20
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20




# The collectives sharded training issues (FSDP2 calls the *_single forms; FSDP and DeepSpeed the *_tensor ones).
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
               "all_reduce")


@contextlib.contextmanager
def count_collectives():
    """Counts the calls of each ``torch.distributed`` collective in :data:`COLLECTIVES` made in the block, by
    wrapping them in the module the engines call them from: yields a dict name -> count, filled as they run.
    ``all_gather`` = all_gather_single + all_gather_into_tensor (the weights gathered), likewise
    ``reduce_scatter``."""
    import torch.distributed as dist

    counts = {name: 0 for name in COLLECTIVES}
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        counts["all_gather"] = counts["all_gather_single"] + counts["all_gather_into_tensor"]
        counts["reduce_scatter"] = counts["reduce_scatter_single"] + counts["reduce_scatter_tensor"]


def kernel_calls(fn: Callable[[], Any], prefix: str = "softprompt_kernels::") -> Tuple[Any, Dict[str, int]]:
    """Runs ``fn`` under the profiler; returns its result and how often each op named ``prefix...`` ran (the
    project's registered ops, forward and backward: evidence that its kernels, not a fallback, did the work)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    calls: Dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith(prefix):
            calls[event.name] = calls.get(event.name, 0) + 1
    return result, calls
