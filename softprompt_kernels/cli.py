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
import importlib
import sys
from typing import Optional, Sequence

from .cli_format import HelpFormatter

HELP_FORMAT = HelpFormatter  # every option's default once, where it says something


# Each command is owned by its package's module (add_arguments, run_from_args): name -> (module, help, description).
COMMANDS = {
    "bench": ("bench.run", "benchmark the ops (or a training step, or serving) on this machine",
              "Runs a benchmark suite: every provider of a case timed side by side in one run (medians), speed-ups "
              "against the pure-PyTorch path (torch) and SDPA on pre-concatenated k/v (sdpa_concat); prints a table "
              "and writes <out>/<suite>.json and <out>/<suite>.png."),
    "serve": ("serving.cli", "serve many prompt adapters of one model over HTTP (OpenAI completions and chat)",
              "Loads a causal LM and PEFT prompt adapters into a PromptBank and answers POST /v1/completions and "
              "/v1/chat/completions (streaming with stream: true), with continuous batching across adapters; GET "
              "/v1/models, /health, /metrics."),
    "train": ("train.cli", "train soft prompts (one, or a sweep of candidates together) on a frozen model",
              "Trains prompt tuning, P-tuning or prefix tuning on the accelerated model from a JSONL file; --sweep "
              "trains several candidates in one run (one frozen forward over the batch repeated per candidate, "
              "through prompt_ids). Writes the best candidate as a PEFT adapter directory."),
    "inspect": ("train.inspect_prompt",
                "what a learned prompt is close to: nearest vocabulary tokens, norms, per-layer prefix norms",
                "Per virtual token: the nearest vocabulary tokens by cosine similarity and its norm against the "
                "vocabulary's; per layer, the prefix norms of prefix adapters. A weak explanation of a soft prompt "
                "(Khashabi et al., Prompt Waywardness)."),
    "toy-model": ("bench.toy_task", "write a tiny toy causal LM (not a real model) to try train, inspect and serve on",
                  "Writes OUT_DIR: a tiny Llama (2 layers, head dim 32) briefly trained on toy sentences of 38 words, "
                  "its tokenizer with a chat template, and JSONL data of the toy task under OUT_DIR/data. A toy for "
                  "trying the commands offline, not a real language model."),
}


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


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="softprompt-kernels", formatter_class=HELP_FORMAT,
                                     description="Fused kernels for soft-prompt methods over frozen models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text, description) in COMMANDS.items():
        owner = importlib.import_module(f".{module}", __package__)
        command = subparsers.add_parser(name, help=help_text, description=description, formatter_class=HELP_FORMAT)
        owner.add_arguments(command)
        command.set_defaults(handler=owner.run_from_args)
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
