"""The serving benchmark runs (quick suite) and writes its records, with the bank's tokens all correct."""
import json

import pytest

pytest.importorskip("peft")


def test_quick_serving_benchmark(tmp_path):
    from softprompt_kernels.cli import main

    assert main(["bench", "--suite", "serve-cpu-quick", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "serve-cpu-quick.json").read_text())
    providers = {r["provider"] for r in records}
    assert providers == {"bank", "bare", "peft_loop", "peft_generate"}
    bank = next(r for r in records if r["provider"] == "bank")
    assert bank["config"]["wrong_rows"] == 0 and bank["config"]["tokens_per_s"] > 0
    assert "p99_ms_per_token" in bank["config"]
    assert (tmp_path / "serve-cpu-quick.png").stat().st_size > 1000


def test_quick_serving_load_benchmark(tmp_path, capsys):
    from softprompt_kernels.cli import main

    assert main(["bench", "--suite", "serve-load-cpu-quick", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "serve-load-cpu-quick.json").read_text())
    assert {(r["config"]["kind"], r["provider"]) for r in records} == {
        (kind, provider) for kind in ("saturation", "poisson") for provider in ("today", "static", "continuous")}
    for r in records:
        assert r["config"]["ttft_p99_ms"] >= r["config"]["ttft_p50_ms"] > 0 and r["config"]["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "p99 time to first token, continuous vs static" in out and "tokens/s at saturation" in out
