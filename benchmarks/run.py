"""Runs a benchmark suite: ``python -m benchmarks.run --suite cpu --out DIR [--reps N] [--providers a,b]``.

Prints one line per case while it runs, then the table last; writes ``DIR/<suite>.json``
and ``DIR/<suite>.png``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

import torch

import softprompt_kernels
from benchmarks import harness
from benchmarks import decode_cases
from benchmarks import insertion_cases
from benchmarks import peft_training_cases
from benchmarks import prefix_attention_cases as cases

# Every benchmark module: BENCH, SUITES, build(case, device, providers), known_providers().
MODULES = (cases, peft_training_cases, insertion_cases, decode_cases)
ALL_SUITES = {name: module for module in MODULES for name in module.SUITES}

DEFAULT_OUT = "bench-out"


def default_suite(quick: bool = False) -> str:
    """The suite for this machine: the GPU one when CUDA is available, else the CPU one."""
    base = "gpu" if torch.cuda.is_available() else "cpu"
    return f"{base}-quick" if quick else base


def _check_providers(module, providers: Optional[Sequence[str]]) -> None:
    if providers is None:
        return
    unknown = sorted(set(providers) - set(module.known_providers()))
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; this benchmark has {module.known_providers()}")


def run_bench(suite: str, out: str = DEFAULT_OUT, reps: Optional[int] = None,
              providers: Optional[Sequence[str]] = None,
              min_time_s: Optional[float] = None) -> List[harness.Record]:
    """Runs ``suite``, writes its JSON and PNG under ``out``, prints the table last."""
    if suite not in ALL_SUITES:
        raise SystemExit(f"unknown suite {suite!r}; choose one of {sorted(ALL_SUITES)}")
    module = ALL_SUITES[suite]
    spec = module.SUITES[suite]
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"suite {suite!r} needs a CUDA device and none is available")
    _check_providers(module, providers)
    timing = spec.timing
    if reps is not None:
        timing = replace(timing, reps=reps)
    if min_time_s is not None:
        timing = replace(timing, min_time_s=min_time_s)
    device = torch.device(spec.device)
    print(f"{module.BENCH} suite {suite!r}: {len(spec.cases)} cases on {harness.device_name(device)}; "
          f"backends here: {', '.join(softprompt_kernels.available_backends())}", flush=True)
    records = harness.run_cases(module.BENCH, spec.cases, lambda c: module.build(c, device, providers),
                                device, timing)
    _write(records, Path(out), suite)
    harness.print_table(records)
    for line in getattr(module, "goals", lambda _records: [])(records):  # the goals, met or not
        print(f"goal: {line}")
    return records


def _write(records: List[harness.Record], out: Path, suite: str) -> None:
    print(f"wrote {harness.write_json(records, out / f'{suite}.json')}")
    try:
        print(f"wrote {harness.plot(records, out / f'{suite}.png')}")
    except ImportError:  # the GPU machine has no matplotlib; the JSON is what gets committed
        print("matplotlib is not installed: no plot written")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=None, choices=sorted(ALL_SUITES),
                        help="default: gpu when CUDA is available, else cpu")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    parser.add_argument("--reps", type=int, default=None,
                        help="minimum repetitions per provider (CUDA: interleaved do_bench rounds)")
    parser.add_argument("--min-time", type=float, default=None, dest="min_time_s",
                        help="minimum seconds of timing per case (default: the suite's)")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of providers, e.g. {','.join(cases.BASE_PROVIDERS)}")
    args = parser.parse_args(argv)
    providers = args.providers.split(",") if args.providers else None
    run_bench(args.suite or default_suite(), args.out, args.reps, providers, args.min_time_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
