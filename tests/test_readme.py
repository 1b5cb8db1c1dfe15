"""The README's examples run as written.

Every ```python block runs in a subprocess of its own, in a fresh directory, with a timeout. The ```bash blocks
(the command-line examples: `softprompt-kernels toy-model`, `train`, `inspect`, `serve`, `curl`) run in README
order in one directory, since each builds on the ones before (the toy model, then adapters, then the server over
them). A block that cannot run here is marked on the line right before it with
``<!-- readme-test: skip (the reason) -->``; ``SKIPPED`` below lists those blocks, and a test fails when the
markers and the list differ, so no block is skipped silently. A Python block marked
``<!-- readme-test: torchrun (reason) -->`` is a script for torchrun and runs under it with one process.

What the test changes in a command, and only this: ``softprompt-kernels`` runs this checkout's code with this
interpreter (a wrapper first on PATH), with one thread per process (OMP_NUM_THREADS=1); the server listens on a free port instead of 8000 (another test or program
may hold 8000) and the curl requests go there; curl gets ``--fail-with-body`` so that an HTTP error fails its block.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT_S = 600          # one block (the longest, the FSDP2 script under torchrun, takes well under a minute here)
SERVER_START_S = 180

# (section heading, language) of every block marked skip, with what its reason must mention.
SKIPPED = {
    ("Two commands", "bash"): "whole suite",
    ("Installing", "bash"): "installs packages",
    ("Sharded training (FSDP2, FSDP through Accelerate / Trainer, ZeRO-3)", "bash"): "tests/test_hf_sharded.py",
    ("Serving on vLLM", "bash"): "vLLM's own venv",
    ("Serving on vLLM", "python"): "vLLM's own venv",
}

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!-- readme-test: (skip|torchrun) \((.+)\) -->$")


@dataclass
class Block:
    lang: str
    code: str
    line: int                                # 1-based line of the opening fence
    heading: str                             # the section it is in
    marker: Optional[Tuple[str, str]]        # ("skip" | "torchrun", reason) from the line before the fence

    @property
    def id(self) -> str:
        return f"line{self.line}-" + re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]


def readme_blocks(text: str) -> List[Block]:
    lines = text.splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        end = i + 1
        while not lines[end].startswith("```"):
            end += 1
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        blocks.append(Block(opening.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1, heading,
                            marker.groups() if marker else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


# --- what is in the README (fast)


def test_markers_are_well_formed_and_each_comes_right_before_a_block():
    lines = README.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip().startswith("<!--") and "readme-test" in line:
            assert MARKER.match(line.strip()), f"README line {number}: malformed marker {line!r}"
            assert number < len(lines) and FENCE.match(lines[number]) and lines[number] != "```", \
                f"README line {number}: a readme-test marker must be the line right before a code block's fence"


def test_every_block_is_run_or_skipped_with_its_reason_listed():
    assert {b.lang for b in BLOCKS} <= {"python", "bash", ""}, "a block in another language would not be tested"
    skipped = {(b.heading, b.lang): b.marker[1] for b in BLOCKS if b.marker and b.marker[0] == "skip"}
    assert len(skipped) == sum(1 for b in BLOCKS if b.marker and b.marker[0] == "skip"), "two skips in one section"
    assert set(skipped) == set(SKIPPED), "the README's skip markers and SKIPPED differ: update both on purpose"
    for key, reason in skipped.items():
        assert SKIPPED[key] in reason, (key, reason)
    for block in BASH:
        if not block.marker:
            assert "softprompt-kernels " in block.code or "curl " in block.code, \
                f"README line {block.line}: a bash block that is not a command-line example must be marked skip"
    assert not [b.line for b in BLOCKS if "MODEL_DIR" in b.code], "a placeholder model: use the toy model"


def test_family_counts_in_the_prose_are_the_tables():
    text = README.read_text()
    decoders = text.count("| tested | parity with PEFT in tests/test_hf_family_matrix.py |")
    encoders = text.count("| tested | as an encoder")
    assert (decoders, encoders) == (int(re.search(r"(\d+) causal-LM families are checked against PEFT", text)[1]), 2)
    assert int(re.search(r": (\d+) tested against PEFT", text)[1]) == decoders + encoders
    assert int(re.search(r"count of (\d+) \"tested\" families is these (\d+) decoders", text)[1]) == decoders + encoders
    assert int(re.search(r"these (\d+) decoders plus BERT and RoBERTa", text)[1]) == decoders


# --- running them


def _env(bin_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    # One thread per process: the examples' models are tiny (no gain from more), and on a machine whose cores are
    # shared, several spinning threads per process made a block 10x slower.
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """``softprompt-kernels`` as this checkout's code under this interpreter, first on PATH."""
    bin_dir = tmp_path_factory.mktemp("bin")
    wrapper = bin_dir / "softprompt-kernels"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m softprompt_kernels.cli "$@"\n')
    wrapper.chmod(0o755)
    return _env(bin_dir)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs(block, tmp_path, env):
    if block.marker and block.marker[0] == "skip":
        pytest.skip(f"README line {block.line}: {block.marker[1]}")
    script = tmp_path / "block.py"
    script.write_text(block.code)
    if block.marker and block.marker[0] == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)]
    else:
        command = [sys.executable, str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, \
        f"README line {block.line} ({block.heading}):\n{_tail(result.stdout + result.stderr)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_server(code: str) -> bool:
    return code.lstrip().startswith("softprompt-kernels serve")


def _start_server(code: str, port: int, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """The block's one command, in the background, on ``port``; returns once /health answers."""
    command = " ".join(line.rstrip("\\").strip() for line in code.strip().splitlines() if line.strip())
    assert "\n" not in command and "&&" not in command and ";" not in command, "a serve block holds one command"
    process = subprocess.Popen(["bash", "-c", f"exec {command} --port {port}"], cwd=cwd, env=env,
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{_tail(log.read_text())}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"the server did not answer /health in {SERVER_START_S} s:\n{_tail(log.read_text())}")


def _json_objects(text: str) -> list:
    decoder, objects, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        objects.append(obj)
    return objects


@pytest.mark.slow
def test_command_line_examples_run_in_order(tmp_path, env):
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("the README's requests need curl, which this machine lacks")
    port = _free_port()
    servers = []
    ran = []
    try:
        for block in BASH:
            if block.marker and block.marker[0] == "skip":
                continue
            code = block.code.replace("localhost:8000", f"localhost:{port}")
            if _is_server(code):
                servers.append(_start_server(code, port, tmp_path, env, tmp_path / f"server-{block.line}.log"))
                ran.append(block.line)
                continue
            code = code.replace("curl -s ", "curl -s --fail-with-body ")
            result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=TIMEOUT_S)
            assert result.returncode == 0, \
                f"README line {block.line} ({block.heading}):\n{_tail(result.stdout + result.stderr)}"
            if "curl " in code:  # every request answered with a completion
                answers = _json_objects(result.stdout)
                assert len(answers) == code.count("curl ") and all(a["choices"] for a in answers), result.stdout
            ran.append(block.line)
        for server in servers:  # SIGTERM: a clean shutdown, exit status 0 (the README says so)
            os.killpg(server.pid, signal.SIGTERM)
            assert server.wait(timeout=60) == 0
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    assert ran, "no command-line example ran"
    # what the examples say they write
    for path in ("toy/config.json", "toy/data/train.jsonl", "runs/prompt/adapter_config.json", "runs/sweep/sweep.png",
                 "report.json", "adapters/cats/adapter_model.safetensors", "adapters/dogs/adapter_model.safetensors"):
        assert (tmp_path / path).exists(), path
    assert len(json.loads((tmp_path / "runs/sweep/metrics.json").read_text())["candidates"]) == 4
