"""`make test` runs the pytest suite and the vLLM plugin's tests both, whatever the first gives, and fails at
the end naming what failed (a copy of the Makefile over fake virtual environments: nothing is built)."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

FAKE_PYTHON = """#!/bin/sh
echo "$0 $*" >> "LOG"
exit ${RC:-0}
"""


def _checkout(root: Path) -> Path:
    """The Makefile with its inputs older than every stamp, and fake pythons in .venv and .venv-vllm."""
    shutil.copy(ROOT / "Makefile", root / "Makefile")
    for name in ("requirements-dev.txt", "setup.py", "pyproject.toml"):
        (root / name).write_text("")
    (root / "tests_vllm").mkdir()
    old = time.time() - 3600
    for name in ("requirements-dev.txt", "setup.py", "pyproject.toml"):
        os.utime(root / name, (old, old))
    log = root / "calls.log"
    for venv, rc in ((".venv", "PYTEST_RC"), (".venv-vllm", "VLLM_RC")):
        (root / venv / "bin").mkdir(parents=True)
        python = root / venv / "bin" / "python"
        python.write_text(FAKE_PYTHON.replace("LOG", str(log)).replace("RC", rc))
        python.chmod(0o755)
    for stamp in (".venv/.deps", ".venv/.built", ".venv/.deepspeed", ".venv-vllm/.deps"):
        (root / stamp).write_text("")
    return log


@pytest.mark.parametrize("pytest_rc,vllm_rc", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_make_test_runs_both_suites_and_fails_at_the_end(tmp_path, pytest_rc, vllm_rc):
    log = _checkout(tmp_path)
    env = {**os.environ, "PYTEST_RC": str(pytest_rc), "VLLM_RC": str(vllm_rc)}
    env.pop("MAKEFLAGS", None)
    result = subprocess.run(["make", "--no-print-directory", "test"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert len(calls) == 2, (calls, result.stdout, result.stderr)
    assert ".venv/bin/python -m pytest -q" in calls[0] and ".venv-vllm/bin/python -m pytest -q" in calls[1]
    assert (result.returncode == 0) == (pytest_rc == 0 and vllm_rc == 0), result.stderr
    if pytest_rc:
        assert "pytest (tests/)" in result.stderr
    if vllm_rc:
        assert "make test-vllm (tests_vllm/)" in result.stderr
    if not (pytest_rc or vllm_rc):
        assert "failed" not in result.stderr
