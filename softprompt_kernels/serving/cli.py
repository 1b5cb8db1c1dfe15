"""``softprompt-kernels serve`` with the built-in engine: its arguments and its start-up.

(``--engine vllm`` never reaches this module: the top-level command hands its arguments to vllm/launch.py.)
Importing this module imports nothing of the serve extra, so that the parser is built anywhere and a missing
dependency is named with the extra to install instead of failing on an import.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

PROG = "softprompt-kernels serve"
INSTALL = "pip install 'softprompt-kernels[serve]'"
# what the serve extra brings (pyproject.toml), in the order a start-up needs them
EXTRA_MODULES = ("transformers", "peft", "safetensors", "pydantic", "fastapi", "uvicorn", "prometheus_client")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(serve: argparse.ArgumentParser) -> None:
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


def missing_dependency() -> Optional[str]:
    """The first module of the serve extra that cannot be imported (None: all can)."""
    for module in EXTRA_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return exc.name or module  # a dependency of the module, when that is what is missing
    return None


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def run_from_args(args: argparse.Namespace) -> int:
    missing = missing_dependency()
    if missing is not None:
        return _fail(f"needs {missing}, which is not installed: {INSTALL}")
    import torch
    import transformers

    from .api import RESERVED_NAMES
    from .bank import PromptBank
    from .server import CompletionServer, is_loopback

    adapters = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            return _fail(f"--adapter takes NAME=PATH, got {spec!r}")
        if name in RESERVED_NAMES:
            return _fail(f"--adapter {spec!r}: the name {name!r} is reserved for the bare model; choose another")
        if name in dict(adapters):
            return _fail(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters.append((name, path))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        model = model.to(args.device)
    except (OSError, ValueError) as exc:
        return _fail(f"--model {args.model}: cannot be loaded as a causal LM ({str(exc).splitlines()[0]})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None  # token-id prompts only
    try:
        bank = PromptBank(model, capacity=args.capacity)
    except ValueError as exc:
        return _fail(f"--model {args.model}: {exc}")
    refused = []
    for name, path in adapters:
        try:
            bank.add(name, path)
        except (ValueError, OSError, KeyError) as exc:
            refused.append(f"adapter {name!r} ({path}): {str(exc).splitlines()[0]}")
    if refused:
        for line in refused:
            print(f"{PROG}: {line}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        print(f"{PROG}: warning: binding {args.host} makes the server reachable from other machines; it has no "
              "authentication", file=sys.stderr)
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
        return _fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror})")
    print(f"serving {['base', *bank.names()]} on {server.address} (POST /v1/completions, /v1/chat/completions; "
          f"{server.engine.batching} batching)", flush=True)
    server.serve_forever()
    return 0
