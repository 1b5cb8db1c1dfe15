"""Benchmark machinery shared by every suite: timing, peak memory, records, table, plot.

Nothing here knows about a particular op. A benchmark module (the protocol: bench/__init__.py)
either supplies ``build(case, device, providers)`` returning a :class:`CaseSetup` (a config, a FLOP
and byte count, and one zero-argument callable per provider), which :func:`run_cases` times side by
side and measures for peak memory, or ``measure(case, device, providers, timing)`` returning its own
:class:`Record` objects (serving: tokens/s of whole generations). :func:`write_json`,
:func:`print_table` and :func:`plot` report both alike.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .._version import __version__
from ..profiling import peak_memory_mb

# In a source checkout (and an editable install) the package sits in the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
# The provider speed-ups are taken against: the first one of these present in a suite's records.
BASELINES = ("torch", "peft", "bare", "vllm")  # vllm: bare vLLM, the vLLM serving benchmark's floor
# A second speed-up column, against each of these that is present and is not the baseline: the
# copy-free lower bound of the op (sdpa_concat) and the bare frozen model (what prompt learning can
# at best cost).
REFERENCES = ("sdpa_concat", "bare")
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclass
class Record:
    """One provider on one case: the JSON record of docs/DESIGN.md section 7."""

    bench: str
    provider: str
    device: str
    commit: str
    config: Dict[str, Any]
    ms: float
    tflops: float
    gbps: float
    peak_mem_mb: Optional[float]


@dataclass
class CaseSetup:
    """A case ready to time: inputs already built and captured by the provider callables."""

    config: Dict[str, Any]  # JSON-able; "name" is the label used in tables and plots
    flops: float
    bytes: float  # approximate bytes that must move per call (for GB/s)
    providers: Dict[str, Callable[[], Any]]
    skipped: Dict[str, str] = field(default_factory=dict)  # provider -> why it cannot run


@dataclass(frozen=True)
class Timing:
    """How hard to time. On CPU ``reps`` is the minimum number of interleaved rounds and
    ``min_time_s`` the minimum wall time of the whole round-robin; on CUDA ``reps`` is the
    number of rounds, each a ``do_bench`` median over about ``min_time_s / reps`` seconds."""

    reps: int = 30
    warmup: int = 3
    min_time_s: float = 0.5
    max_reps: int = 100_000


@dataclass(frozen=True)
class Suite:
    name: str
    device: str  # "cpu" or "cuda"
    cases: Sequence[Any]
    timing: Timing


def git_commit(repo: Path = REPO_ROOT) -> str:
    """Short HEAD hash, ``-dirty`` when tracked files differ from HEAD; ``release-<version>`` for an
    installed wheel (no source checkout around the package); "unknown" when git cannot tell.

    Untracked files are ignored on purpose: benchmark output written into the tree would
    otherwise mark every later run dirty. ``SOFTPROMPT_COMMIT`` overrides it: a lent GPU
    machine gets a copy of the tree without its git history."""
    if os.environ.get("SOFTPROMPT_COMMIT"):
        return os.environ["SOFTPROMPT_COMMIT"]
    if not (Path(repo) / "setup.py").is_file() or not (Path(repo) / "csrc").is_dir():
        return f"release-{__version__}"

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """``cpu: <model> (<n> threads, <vector ISA>)`` or the CUDA device's name. The ISA tells apart machines that
    share a model name (an "AMD EPYC" with AVX-512 and one with AVX2 only run the CPU kernel at different speeds)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa = torch.backends.cpu.get_cpu_capability().lower()
    return f"cpu: {_cpu_model()} ({torch.get_num_threads()} threads, {isa})"


def _cpu_seconds() -> Optional[Tuple[float, float, float]]:
    """(wall time, busy CPU seconds of the whole machine, CPU seconds of this process); None off Linux."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return time.perf_counter(), busy, own.user + own.system


def contention_note(before: Optional[Tuple[float, float, float]]) -> Optional[str]:
    """A warning when other processes kept the CPUs busy since ``before`` (a :func:`_cpu_seconds`)."""
    after = _cpu_seconds()
    if before is None or after is None:
        return None
    wall, busy, own = (a - b for a, b in zip(after, before))
    others = max(0.0, busy - own) / max(wall * (os.cpu_count() or 1), 1e-9)
    if others < 0.1:
        return None
    return (f"other processes kept {others:.0%} of the {os.cpu_count()} CPUs busy during the run: absolute "
            f"times may be inflated (ratios are measured side by side)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rotated(names: List[str], shift: int) -> List[str]:
    # Rotating the order keeps any provider from always running right after another one
    # (cache state, frequency ramps) and spreads slow drifts of the machine evenly.
    shift %= len(names)
    return names[shift:] + names[:shift]


def _time_cpu(fns: Mapping[str, Callable[[], Any]], timing: Timing) -> Dict[str, float]:
    names = list(fns)
    for name in names:
        for _ in range(timing.warmup):
            fns[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < timing.max_reps and (rounds < timing.reps or time.perf_counter() - start < timing.min_time_s):
        for name in _rotated(names, rounds):
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def _cuda_events_ms(fn: Callable[[], Any], rep_ms: float, device: torch.device) -> float:
    """Median of per-call CUDA event times, flushing L2 before each call (as do_bench does)."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: List[float] = []
    while len(times) < 1000 and (not times or sum(times) < rep_ms):
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cuda_bench_fn(device: torch.device) -> Callable[[Callable[[], Any], float, bool], float]:
    try:
        from triton.testing import do_bench
    except ImportError:
        return lambda fn, rep_ms, first: _cuda_events_ms(fn, rep_ms, device)
    return lambda fn, rep_ms, first: float(do_bench(fn, warmup=25 if first else 1, rep=rep_ms,
                                                    return_mode="median"))


def _time_cuda(fns: Mapping[str, Callable[[], Any]], timing: Timing, device: torch.device) -> Dict[str, float]:
    bench = _cuda_bench_fn(device)
    rounds = max(1, timing.reps)
    rep_ms = max(10.0, timing.min_time_s * 1e3 / rounds)
    medians: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in _rotated(list(fns), r):
            medians[name].append(bench(fns[name], rep_ms, r == 0))
    return {name: statistics.median(m) for name, m in medians.items()}


def timed_call(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], d_out: torch.Tensor,
               mode: str) -> Callable[[], Any]:
    """The timed callable: forward under no_grad, or forward + backward. ``autograd.grad``
    returns the gradients instead of accumulating them into ``.grad``, so nothing needs
    zeroing between calls."""
    if mode == "fwd":
        def run_fwd():
            with torch.no_grad():
                return forward()
        return run_fwd

    def run_fwd_bwd():
        return torch.autograd.grad(forward(), leaves, d_out)
    return run_fwd_bwd


def time_interleaved(fns: Mapping[str, Callable[[], Any]], device: torch.device,
                     timing: Timing = Timing()) -> Dict[str, float]:
    """Milliseconds per call of each provider, measured round-robin in one run.

    Interleaving makes the ratios between providers robust on noisy machines: a slow
    phase of the machine hits every provider alike instead of whichever ran then.
    CPU: median of ``time.perf_counter`` per call after ``warmup`` calls each.
    CUDA: median over rounds of ``triton.testing.do_bench`` medians (CUDA events if
    triton is missing)."""
    if not fns:
        return {}
    device = torch.device(device)
    return _time_cuda(fns, timing, device) if device.type == "cuda" else _time_cpu(fns, timing)


def _runnable(setup: CaseSetup, device: torch.device, notes: List[str]) -> Dict[str, Callable[[], Any]]:
    """Providers whose first call succeeds; one that runs out of memory or fails is dropped with a note."""
    ok = {}
    for name, fn in setup.providers.items():
        try:
            fn()
            _sync(device)
            ok[name] = fn
        except OOM_ERRORS:
            torch.cuda.empty_cache()  # a no-op without CUDA
            notes.append(f"{setup.config.get('name')}: {name} ran out of memory; no record")
        except Exception as exc:  # noqa: BLE001 - one broken backend must not cost the whole (GPU) run
            first_line = (str(exc).splitlines() or [""])[0][:200]
            notes.append(f"{setup.config.get('name')}: {name} FAILED "
                         f"({type(exc).__name__}: {first_line}); no record")
    return ok


def _records(bench: str, setup: CaseSetup, ms: Dict[str, float], mem: Dict[str, Optional[float]],
             device: str, commit: str) -> List[Record]:
    return [Record(bench=bench, provider=name, device=device, commit=commit, config=dict(setup.config),
                   ms=t, tflops=setup.flops / (t * 1e-3) / 1e12, gbps=setup.bytes / (t * 1e-3) / 1e9,
                   peak_mem_mb=mem.get(name))
            for name, t in ms.items()]


def _measure(setup: CaseSetup, device: torch.device, timing: Timing, notes: List[str]):
    fns = _runnable(setup, device, notes)
    try:
        ms = time_interleaved(fns, device, timing)
    except OOM_ERRORS:  # rare: fits once, not repeatedly; skip the case rather than guess
        torch.cuda.empty_cache()
        notes.append(f"{setup.config.get('name')}: ran out of memory while timing; case skipped")
        return {}, {}
    mem = {}
    for name, fn in fns.items():
        with contextlib.suppress(*OOM_ERRORS):
            mem[name] = peak_memory_mb(fn, device)
    return ms, mem


def run_cases(bench: str, cases: Iterable[Any], build: Callable[[Any], CaseSetup], device: torch.device,
              timing: Timing = Timing(), log: Callable[[str], None] = print) -> List[Record]:
    """Builds, times and measures every case; returns its records. Prints one line per case
    and, at the end, notes on providers that were skipped or ran out of memory."""
    device = torch.device(device)
    dev_name, commit = device_name(device), git_commit()
    records: List[Record] = []
    notes: List[str] = []
    cases = list(cases)
    cpu_before = _cpu_seconds()
    for i, case in enumerate(cases, 1):
        try:
            setup = build(case)
        except OOM_ERRORS:
            torch.cuda.empty_cache()
            notes.append(f"{case}: inputs do not fit in memory; case skipped")
            continue
        notes.extend(f"{name}: {why}" for name, why in setup.skipped.items())
        ms, mem = _measure(setup, device, timing, notes)
        records.extend(_records(bench, setup, ms, mem, dev_name, commit))
        summary = ", ".join(f"{name} {t:.3f} ms" for name, t in ms.items())
        log(f"[{i}/{len(cases)}] {setup.config.get('name')}: {summary}")
        del setup
        torch.cuda.empty_cache()
    notes.append(contention_note(cpu_before))
    for note in filter(None, dict.fromkeys(notes)):  # unique, in order
        log(f"note: {note}")
    return records


def run_measured(cases: Iterable[Any], measure: Callable[[Any], List[Record]], device: torch.device,
                 log: Callable[[str], None] = print) -> List[Record]:
    """Runs suites whose module measures its own records (``measure(case)``); one line per case."""
    cases = list(cases)
    records: List[Record] = []
    cpu_before = _cpu_seconds()
    for i, case in enumerate(cases, 1):
        case_records = measure(case)
        records.extend(case_records)
        summary = ", ".join(f"{r.provider} {r.ms:.1f} ms" for r in case_records)
        name = case_records[0].config.get("name") if case_records else case
        log(f"[{i}/{len(cases)}] {name}: {summary}")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    note = contention_note(cpu_before)
    if note:
        log(f"note: {note}")
    return records


def write_json(records: Sequence[Record], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    return path


def _by_case(records: Sequence[Record]) -> Dict[str, Dict[str, Record]]:
    cases: Dict[str, Dict[str, Record]] = {}
    for r in records:
        cases.setdefault(r.config.get("name") or json.dumps(r.config, sort_keys=True), {})[r.provider] = r
    return cases


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and every process it started, waiting (up to 10 s) for those descendants to die.

    Killing a process group is not enough for ``torch.distributed.run``: it starts each rank in a session of its
    own, so its ranks would outlive it (stuck in a rendezvous, holding its output pipe open). The process itself is
    left for its parent to reap (``Popen.wait``)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        descendants = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in [parent, *descendants]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(descendants, timeout=10)


def free_port() -> int:
    """A TCP port free on loopback now (for a server or a process group a benchmark starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_of(records: Sequence[Record]) -> Optional[str]:
    present = {r.provider for r in records}
    return next((name for name in BASELINES if name in present), None)


def _providers(records: Sequence[Record]) -> List[str]:
    names = list(dict.fromkeys(r.provider for r in records))
    baseline = baseline_of(records)
    return sorted(names, key=lambda n: n != baseline)  # baseline first, others in run order


def _speedup(case: Dict[str, Record], name: str, baseline: Optional[str]) -> Optional[float]:
    if baseline not in case or name not in case:
        return None
    return case[baseline].ms / case[name].ms


def _column_group(title: str, names: List[str], values: Dict[str, List[Optional[float]]], fmt: str,
                  min_col: int) -> List[str]:
    """One titled group of columns, as text lines: title, names, then one line per case."""
    col = max(min_col, *(len(n) + 1 for n in names), -(-(len(title) + 2) // len(names)))
    lines = [title.center(col * len(names)), "".join(n.rjust(col) for n in names)]
    for row in zip(*(values[n] for n in names)):
        lines.append("".join(("-" if v is None else format(v, fmt)).rjust(col) for v in row))
    return lines


def reference_columns(records: Sequence[Record]) -> List[str]:
    """The providers of :data:`REFERENCES` present that get a speed-up column of their own."""
    present, baseline = {r.provider for r in records}, baseline_of(records)
    return [name for name in REFERENCES if name in present and name != baseline]


def format_table(records: Sequence[Record]) -> str:
    """Fixed-width table: one row per case; ms, speed-up vs the baseline (and vs each reference
    provider present, e.g. sdpa_concat) and peak MiB per provider."""
    if not records:
        return "(no records)"
    names = _providers(records)
    cases = _by_case(records)

    def column(get, among) -> Dict[str, List[Optional[float]]]:
        return {n: [get(case, n) if n in case else None for case in cases.values()] for n in among}

    baseline = baseline_of(records)
    groups = [_column_group("ms per call", names, column(lambda c, n: c[n].ms, names), ".3f", 10)]
    for reference in ([baseline] if baseline else []) + reference_columns(records):
        others = [n for n in names if n not in (baseline, reference)]
        if others:
            groups.append(_column_group(f"speed-up vs {reference}", others,
                                        column(lambda c, n, ref=reference: _speedup(c, n, ref), others), ".2f", 10))
    if any(r.peak_mem_mb is not None for r in records):
        groups.append(_column_group("peak MiB", names, column(lambda c, n: c[n].peak_mem_mb, names), ".2f", 10))
    width = max(len("case"), *(len(c) for c in cases))
    first = ["", "case", *cases]
    rows = [first[i].ljust(width) + " |" + " |".join(g[i] for g in groups) for i in range(len(first))]
    rows.insert(2, "-" * len(rows[1]))
    return "\n".join([f"{records[0].bench} on {records[0].device}, commit {records[0].commit}", *rows])


def print_table(records: Sequence[Record]) -> None:
    print(format_table(records), flush=True)


def _throughput(records: Sequence[Record]) -> Tuple[str, Callable[[Record], float]]:
    """What the top panel of the plot shows: TFLOP/s where the suite counts FLOPs, else GB/s, else
    calls per second (always higher is better)."""
    if all(r.tflops > 0 for r in records):
        return "TFLOP/s (higher is better)", lambda r: r.tflops
    if all(r.gbps > 0 for r in records):
        return "GB/s moved (higher is better)", lambda r: r.gbps
    return "calls per second (higher is better)", lambda r: 1e3 / r.ms


def plot(records: Sequence[Record], png_path, case_key: str = "") -> Path:
    """Grouped bars per case: throughput per provider (top) and speed-up vs the baseline (bottom).
    ``case_key`` explains the case labels on the x axis. Uses the Agg backend, so no display is
    needed; raises ImportError without matplotlib."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases, names, baseline = _by_case(records), _providers(records), baseline_of(records)
    labels = list(cases)
    metric_name, metric = _throughput(records)
    width = 0.8 / max(1, len(names))
    fig_width = max(8.0, 1.1 * len(labels) + 3)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(fig_width, 9), sharex=True)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(labels))]
        top.bar(xs, [metric(cases[c][name]) if name in cases[c] else 0.0 for c in labels], width, label=name)
        bottom.bar(xs, [_speedup(cases[c], name, baseline) or 0.0 for c in labels], width, label=name)
    bottom.axhline(1.0, color="black", linewidth=0.8)
    top.set_ylabel(metric_name)
    bottom.set_ylabel(f"speed-up vs {baseline} (x, higher is better)")
    top.set_title(f"{records[0].bench} on {records[0].device} ({records[0].commit})" if records else "")
    top.margins(y=0.25)  # room above the bars for the legend
    top.legend(title="provider", loc="upper left", ncols=min(len(names), 4), fontsize=8, title_fontsize=8)
    bottom.set_xticks(range(len(labels)))
    bottom.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    # The key can be longer than the figure is wide: wrapped (about 14 characters of 8-point text per inch,
    # with a margin), tight_layout then raises the axes to make room for its lines.
    key = "case" + (f": {case_key}" if case_key else "")
    bottom.set_xlabel(textwrap.fill(key, width=max(40, int(fig_width * 13))), fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
