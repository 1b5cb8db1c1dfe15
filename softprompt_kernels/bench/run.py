"""Runs a benchmark suite: ``softprompt-kernels bench --suite NAME`` (or ``python -m softprompt_kernels.bench``).

Prints one line per case while it runs, then the table last; writes ``OUT/<suite>.json`` and
``OUT/<suite>.png``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..cli_format import HelpFormatter
from . import harness

# Every benchmark module of the package (the protocol is in bench/__init__.py).
MODULE_NAMES = ("prefix_attention", "peft_training", "insertion", "decode", "serving", "training_runs", "sharded_training", "serving_load",
                "vllm_serving")
DEFAULT_OUT = "bench-out"


def modules() -> List:
    return [importlib.import_module(f".{name}", __package__) for name in MODULE_NAMES]


def all_suites() -> Dict[str, object]:
    """Suite name -> the module that defines it."""
    return {suite: module for module in modules() for suite in module.SUITES}


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
    import softprompt_kernels

    suites = all_suites()
    if suite not in suites:
        raise SystemExit(f"unknown suite {suite!r}; choose one of {sorted(suites)}")
    module = suites[suite]
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
    if hasattr(module, "measure"):
        records = harness.run_measured(spec.cases, lambda c: module.measure(c, device, providers, timing), device)
    else:
        records = harness.run_cases(module.BENCH, spec.cases, lambda c: module.build(c, device, providers),
                                    device, timing)
    _write(records, Path(out), suite, getattr(module, "CASE_KEY", ""))
    harness.print_table(records)
    for line in getattr(module, "goals", lambda _records: [])(records):  # the suite's goals, met or not
        print(f"goal: {line}")
    return records


def _write(records: List[harness.Record], out: Path, suite: str, case_key: str) -> None:
    print(f"wrote {harness.write_json(records, out / f'{suite}.json')}")
    if not records:
        return
    try:
        print(f"wrote {harness.plot(records, out / f'{suite}.png', case_key)}")
    except ImportError:  # the GPU machine has no matplotlib; the JSON is what gets committed
        print("matplotlib is not installed: no plot written (pip install 'softprompt-kernels[bench]')")


def suite_help() -> str:
    lines = []
    for module in modules():
        names = ", ".join(module.SUITES)
        lines.append(f"{module.BENCH}: {names}")
    return "; ".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``softprompt-kernels bench`` (and ``python -m softprompt_kernels.bench``)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--suite", default=None, metavar="NAME",
                       help=f"the suite to run ({suite_help()}); default: gpu with CUDA, else cpu")
    which.add_argument("--quick", action="store_true", help="the quick suite of this machine (seconds)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory for <suite>.json and <suite>.png")
    parser.add_argument("--reps", type=int, default=None,
                        help="minimum repetitions per provider (CUDA: interleaved do_bench rounds); "
                             "default: the suite's")
    parser.add_argument("--min-time", type=float, default=None, dest="min_time_s",
                        help="minimum seconds of timing per case; default: the suite's")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of the suite's providers, e.g. torch,cpu; default: all")


def run_from_args(args: argparse.Namespace) -> int:
    suite = args.suite or default_suite(quick=args.quick)
    providers = args.providers.split(",") if args.providers else None
    run_bench(suite, args.out, args.reps, providers, args.min_time_s)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softprompt_kernels.bench", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
