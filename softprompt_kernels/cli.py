"""The ``softprompt-kernels`` command.

Subcommands:

- ``bench``: runs a benchmark suite (softprompt_kernels/bench): by default ``prefix_attention`` on every
  fused backend that runs here against the pure-PyTorch path and ``sdpa_concat``; prints a table and
  writes JSON + PNG.
- ``serve``: an HTTP completions server over a ``PromptBank`` of PEFT prompt adapters.
- ``train``: trains soft prompts from a JSONL file (sweeps of candidates in one run); writes a PEFT adapter.
- ``inspect``: the nearest vocabulary tokens and norms of a learned prompt.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter  # every option's help shows its default


def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run.run_from_args(args)


def _add_bench(subparsers) -> None:
    from .bench import run

    bench = subparsers.add_parser(
        "bench", help="benchmark the ops (or a training step, or serving) on this machine", formatter_class=HELP_FORMAT,
        description="Runs a benchmark suite: every provider of a case timed side by side in one run (medians), "
                    "speed-ups against the pure-PyTorch path (torch) and SDPA on pre-concatenated k/v "
                    "(sdpa_concat); prints a table and writes <out>/<suite>.json and <out>/<suite>.png.")
    run.add_arguments(bench)
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
        formatter_class=HELP_FORMAT, description="Loads a causal LM and PEFT prompt adapters into a PromptBank and answers "
                    "POST /v1/completions, batching concurrent requests across adapters.")
    serve.add_argument("--model", required=True, help="a Hugging Face model directory")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="a PEFT prompt adapter directory (repeatable); requests name it in 'model'")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--capacity", type=int, default=64, help="adapters resident on the device at once")
    serve.add_argument("--max-batch", type=int, default=16, dest="max_batch", help="requests batched together")
    serve.add_argument("--max-queue", type=int, default=64, dest="max_queue",
                       help="queued requests beyond which new ones get 503")
    serve.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu or cuda")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                       help="dtype the model is loaded in")
    serve.set_defaults(handler=_serve)


def _add_train(subparsers) -> None:
    from .train import cli as train_cli

    train = subparsers.add_parser(
        "train", help="train soft prompts (one, or a sweep of candidates together) on a frozen model",
        formatter_class=HELP_FORMAT,
        description="Trains prompt tuning, P-tuning or prefix tuning on the accelerated model from a JSONL file; "
                    "--sweep trains several candidates in one run (one frozen forward over the batch repeated per "
                    "candidate, through prompt_ids). Writes the best candidate as a PEFT adapter directory.")
    train_cli.add_arguments(train)
    train.set_defaults(handler=train_cli.run_from_args)


def _add_inspect(subparsers) -> None:
    from .train import inspect_prompt

    inspect = subparsers.add_parser(
        "inspect", help="what a learned prompt is close to: nearest vocabulary tokens, norms, per-layer prefix norms",
        formatter_class=HELP_FORMAT,
        description="Per virtual token: the nearest vocabulary tokens by cosine similarity and its norm against the "
                    "vocabulary's; per layer, the prefix norms of prefix adapters. A weak explanation of a soft prompt "
                    "(Khashabi et al., Prompt Waywardness).")
    inspect_prompt.add_arguments(inspect)
    inspect.set_defaults(handler=inspect_prompt.run_from_args)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="softprompt-kernels", formatter_class=HELP_FORMAT,
                                     description="Fused kernels for soft-prompt methods over frozen models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench(subparsers)
    _add_serve(subparsers)
    _add_train(subparsers)
    _add_inspect(subparsers)
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
