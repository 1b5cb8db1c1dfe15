"""The vLLM serving benchmark runs end to end (quick suite: three servers, a handful of requests): records for
bare vLLM, vLLM with the plugin and the built-in server, and the goal lines. Its numbers live in
benchmarks/results, not here."""
import json

from softprompt_kernels.bench import run


def test_quick_suite_runs_every_provider(tmp_path):
    records = run.run_bench("vllm-serve-cpu-quick", out=str(tmp_path))
    assert sorted(r.provider for r in records) == ["builtin", "vllm", "vllm+softprompt"]
    for r in records:
        assert r.config["tokens"] > 0 and r.config["tokens_per_s"] > 0 and r.config["ttft_p99_ms"] > 0
    saved = json.loads((tmp_path / "vllm-serve-cpu-quick.json").read_text())
    assert len(saved["records"] if isinstance(saved, dict) else saved) == 3
