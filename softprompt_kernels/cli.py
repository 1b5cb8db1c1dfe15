"""The ``softprompt-kernels`` command.

Subcommands:

- ``bench``: runs a benchmark suite (softprompt_kernels/bench): by default ``prefix_attention`` on every
  fused backend that runs here against the pure-PyTorch path and ``sdpa_concat``; prints a table and
  writes JSON + PNG.
- ``serve``: an HTTP completions server over a ``PromptBank`` of PEFT prompt adapters.
- ``train``: trains soft prompts from a JSONL file (sweeps of candidates in one run); writes a PEFT adapter.
- ``inspect``: the nearest vocabulary tokens and norms of a learned prompt.
- ``toy-model``: writes a tiny toy causal LM (tokenizer, chat template, data) to try the commands on.
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
    from .serving.api import RESERVED_NAMES
    from .serving.server import CompletionServer, is_loopback

    def fail(message: str) -> int:
        print(f"softprompt-kernels serve: {message}", file=sys.stderr)
        return 2

    try:
        import transformers
    except ImportError:
        return fail("needs transformers (and peft for adapter directories): pip install 'softprompt-kernels[serve]'")
    adapters = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            return fail(f"--adapter takes NAME=PATH, got {spec!r}")
        if name in RESERVED_NAMES:
            return fail(f"--adapter {spec!r}: the name {name!r} is reserved for the bare model; choose another")
        if name in dict(adapters):
            return fail(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters.append((name, path))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        model = model.to(args.device)
    except (OSError, ValueError) as exc:
        return fail(f"--model {args.model}: cannot be loaded as a causal LM ({str(exc).splitlines()[0]})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None  # token-id prompts only
    try:
        bank = PromptBank(model, capacity=args.capacity)
    except ValueError as exc:
        return fail(f"--model {args.model}: {exc}")
    refused = []
    for name, path in adapters:
        try:
            bank.add(name, path)
        except (ValueError, OSError, KeyError) as exc:
            refused.append(f"adapter {name!r} ({path}): {str(exc).splitlines()[0]}")
    if refused:
        for line in refused:
            print(f"softprompt-kernels serve: {line}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        print(f"softprompt-kernels serve: warning: binding {args.host} makes the server reachable from other "
              "machines; it has no authentication", file=sys.stderr)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    try:
        server = CompletionServer(bank, tokenizer, host=args.host, port=args.port, max_batch=args.max_batch,
                                  max_queue=args.max_queue, eos_token_id=eos, pad_token_id=pad,
                                  max_tokens_limit=args.max_tokens_limit, max_request_tokens=args.max_request_tokens,
                                  max_prefill_tokens=args.max_prefill_tokens, idle_timeout_s=args.idle_timeout,
                                  body_timeout_s=args.body_timeout, batching=args.batching)
    except OSError as exc:
        return fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror})")
    print(f"serving {['base', *bank.names()]} on {server.address} (POST /v1/completions, /v1/chat/completions; "
          f"{server.engine.batching} batching)", flush=True)
    server.serve_forever()
    return 0


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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_serve(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve many prompt adapters of one model over HTTP (OpenAI completions and chat)",
        formatter_class=HELP_FORMAT, description="Loads a causal LM and PEFT prompt adapters into a PromptBank and "
                    "answers POST /v1/completions and /v1/chat/completions (streaming with stream: true), with "
                    "continuous batching across adapters; GET /v1/models, /health, /metrics.")
    serve.add_argument("--engine", default="builtin", choices=["builtin", "vllm"],
                       help="builtin: this package's server over PromptBank; vllm: vLLM's OpenAI server with the "
                            "adapters as a plugin (every argument but --model and --adapter goes to vLLM)")
    serve.add_argument("--model", required=True, help="a Hugging Face model directory")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="a PEFT prompt adapter directory (repeatable); requests name it in 'model' "
                            "('base' is the bare model)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--capacity", type=_positive, default=64, help="adapters resident on the device at once")
    serve.add_argument("--max-batch", type=_positive, default=16, dest="max_batch",
                       help="rows (sequences) decoded together")
    serve.add_argument("--max-queue", type=_positive, default=64, dest="max_queue",
                       help="requests waiting to join the batch beyond which new ones get 503 + Retry-After")
    serve.add_argument("--max-tokens-limit", type=_positive, default=1024, dest="max_tokens_limit",
                       help="largest max_tokens a request may ask for")
    serve.add_argument("--max-request-tokens", type=_positive, default=8192, dest="max_request_tokens",
                       help="per-request budget: prompt tokens + n x max_tokens")
    serve.add_argument("--max-prefill-tokens", type=_positive, default=4096, dest="max_prefill_tokens",
                       help="prompt tokens prefilled between two decode steps (bounds the pause a long prompt "
                            "causes the running requests)")
    serve.add_argument("--idle-timeout", type=float, default=5.0, dest="idle_timeout",
                       help="seconds an idle keep-alive connection stays open")
    serve.add_argument("--body-timeout", type=float, default=10.0, dest="body_timeout",
                       help="seconds a request body may take to arrive (then 408)")
    serve.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                       help="continuous: requests join the running batch at the next step; static: a batch runs "
                            "to its end before the next starts")
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
