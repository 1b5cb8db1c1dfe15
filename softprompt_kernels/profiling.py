"""Peak memory of one call, on CPU and CUDA (used by the benchmarks and the example programs)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional

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


