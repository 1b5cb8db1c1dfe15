"""The ``softprompt-kernels`` command.

Subcommands:

- ``bench``: benchmarks ``prefix_attention`` on this machine (every fused backend that
  runs here against the pure-PyTorch path and ``sdpa_concat``), prints a table and
  writes JSON + PNG. It needs a source checkout: the harness is the repository's
  top-level ``benchmarks/`` package, which is not installed.

- ``serve``: an HTTP completions server over a ``PromptBank`` of PEFT prompt adapters.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

# In a source checkout (and an editable install) the package directory sits in the repo root.
REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchmarksNotFound(RuntimeError):
    """The ``benchmarks`` package of a source checkout could not be found."""


def locate_benchmarks(repo_root: Optional[Path] = None) -> ModuleType:
    """Puts the checkout's ``benchmarks/`` on ``sys.path`` and returns ``benchmarks.run``."""
    repo_root = Path(repo_root or REPO_ROOT)
    if not (repo_root / "benchmarks" / "harness.py").is_file():
        raise BenchmarksNotFound(
            f"`softprompt-kernels bench` needs a source checkout of softprompt-kernels: no benchmarks/ "
            f"package next to {Path(__file__).resolve().parent} (installed from a wheel?). Clone the "
            f"repository and install it with `pip install --no-build-isolation -e .`.")
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    package = importlib.import_module("benchmarks")
    # Another distribution's top-level `benchmarks` could shadow ours; refuse rather than run it.
    if Path(package.__file__).resolve().parent != (repo_root / "benchmarks").resolve():
        raise BenchmarksNotFound(f"`import benchmarks` found {package.__file__}, not {repo_root / 'benchmarks'}")
    return importlib.import_module("benchmarks.run")


def _bench(args: argparse.Namespace) -> int:
    try:
        runner = locate_benchmarks()
    except BenchmarksNotFound as exc:
        print(f"softprompt-kernels bench: {exc}", file=sys.stderr)
        return 2
    suite = args.suite or runner.default_suite(quick=args.quick)
    providers = args.providers.split(",") if args.providers else None
    runner.run_bench(suite, args.out, args.reps, providers, args.min_time_s)
    return 0


def _add_bench(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmark prefix_attention on this machine",
        description="Times prefix_attention on each fused backend that runs here against the pure-PyTorch "
                    "path (torch) and SDPA on pre-concatenated k/v (sdpa_concat); prints a table and "
                    "writes <out>/<suite>.json and <out>/<suite>.png.")
    which = bench.add_mutually_exclusive_group()
    which.add_argument("--suite", default=None,
                       help="cpu, cpu-quick, gpu, gpu-quick (the op), peft-cpu, peft-cpu-quick, peft-gpu (end-to-end "
                            "training step); default: gpu with CUDA, else cpu")
    which.add_argument("--quick", action="store_true", help="the quick suite of this machine (seconds)")
    bench.add_argument("--out", default="bench-out", help="output directory (default bench-out/)")
    bench.add_argument("--reps", type=int, default=None, help="minimum repetitions per provider")
    bench.add_argument("--min-time", type=float, default=None, dest="min_time_s",
                       help="minimum seconds of timing per case (default: the suite's)")
    bench.add_argument("--providers", default=None, help="comma-separated subset, e.g. torch,cpu")
    bench.set_defaults(handler=_bench)


def _serve(args: argparse.Namespace) -> int:
    import torch

    from .serving import PromptBank
    from .serving.server import CompletionServer

    try:
        import transformers
    except ImportError:
        print("softprompt-kernels serve: needs transformers (and peft for adapter directories)", file=sys.stderr)
        return 2
    adapters = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            print(f"softprompt-kernels serve: --adapter takes NAME=PATH, got {spec!r}", file=sys.stderr)
            return 2
        adapters.append((name, path))
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None  # token-id prompts only
    bank = PromptBank(model, capacity=args.capacity)
    for name, path in adapters:
        bank.add(name, path)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    server = CompletionServer(bank, tokenizer, host=args.host, port=args.port, max_batch=args.max_batch,
                              max_queue=args.max_queue, eos_token_id=eos, pad_token_id=pad)
    print(f"serving {['base', *bank.names()]} on {server.address} (POST /v1/completions)", flush=True)
    server.serve_forever()
    return 0


def _add_serve(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve many prompt adapters of one model over HTTP (OpenAI completions style)",
        description="Loads a causal LM and PEFT prompt adapters into a PromptBank and answers "
                    "POST /v1/completions, batching concurrent requests across adapters.")
    serve.add_argument("--model", required=True, help="a Hugging Face model directory")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="a PEFT prompt adapter directory (repeatable); requests name it in 'model'")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--capacity", type=int, default=64, help="adapters resident on the device at once")
    serve.add_argument("--max-batch", type=int, default=16, dest="max_batch")
    serve.add_argument("--max-queue", type=int, default=64, dest="max_queue",
                       help="queued requests beyond which new ones get 503")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    serve.set_defaults(handler=_serve)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="softprompt-kernels",
                                     description="Fused kernels for soft-prompt methods over frozen models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench(subparsers)
    _add_serve(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
