"""The ``softprompt-kernels`` command.

Subcommands:

- ``bench``: runs a benchmark suite (softprompt_kernels/bench): by default ``prefix_attention`` on every
  fused backend that runs here against the pure-PyTorch path and ``sdpa_concat``; prints a table and
  writes JSON + PNG.
- ``serve``: an HTTP completions server over a ``PromptBank`` of PEFT prompt adapters
  (softprompt_kernels/serving/cli.py; ``--engine vllm``: vLLM's server, softprompt_kernels/vllm/launch.py).
- ``train``: trains soft prompts from a JSONL file (sweeps of candidates in one run); writes a PEFT adapter.
- ``inspect``: the nearest vocabulary tokens and norms of a learned prompt.
- ``toy-model``: writes a tiny toy causal LM (tokenizer, chat template, data) to try the commands on.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .cli_format import HelpFormatter

HELP_FORMAT = HelpFormatter  # every option's default once, where it says something


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


def _engine_of(argv: Sequence[str]) -> Optional[str]:
    """The value of ``serve --engine`` (``builtin`` or ``vllm``), read before parsing."""
    if not argv or argv[0] != "serve":
        return None
    for i, arg in enumerate(argv):
        if arg == "--engine" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--engine="):
            return arg.split("=", 1)[1]
    return None


def _is_engine_arg(args: Sequence[str], i: int) -> bool:
    return args[i] == "--engine" or args[i].startswith("--engine=") or (i > 0 and args[i - 1] == "--engine")


def _add_serve(subparsers) -> None:
    from .serving import cli as serve_cli

    serve = subparsers.add_parser(
        "serve", help="serve many prompt adapters of one model over HTTP (OpenAI completions and chat)",
        formatter_class=HELP_FORMAT, description="Loads a causal LM and PEFT prompt adapters into a PromptBank and "
                    "answers POST /v1/completions and /v1/chat/completions (streaming with stream: true), with "
                    "continuous batching across adapters; GET /v1/models, /health, /metrics.")
    serve_cli.add_arguments(serve)
    serve.set_defaults(handler=serve_cli.run_from_args)


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


def _add_toy_model(subparsers) -> None:
    from .bench import toy_task

    toy = subparsers.add_parser(
        "toy-model", help="write a tiny toy causal LM (not a real model) to try train, inspect and serve on",
        description="Writes OUT_DIR: a tiny Llama (2 layers, head dim 32) briefly trained on toy sentences of 38 "
                    "words, its tokenizer with a chat template, and JSONL data of the toy task under OUT_DIR/data. "
                    "A toy for trying the commands offline, not a real language model.")
    toy_task.add_arguments(toy)
    toy.set_defaults(handler=toy_task.run_from_args)


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
    _add_toy_model(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    engine = _engine_of(argv)
    if engine == "vllm":  # vLLM's own server: its arguments pass through unchanged
        from .vllm import launch

        return launch.main([a for i, a in enumerate(argv[1:]) if not _is_engine_arg(argv[1:], i)])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
