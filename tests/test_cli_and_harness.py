"""The `softprompt-kernels bench` command and the benchmark harness (fast: a few seconds)."""
import json
from dataclasses import fields

import pytest
import torch

import softprompt_kernels
from softprompt_kernels.cli import locate_benchmarks, main

runner = locate_benchmarks()  # puts the checkout's benchmarks/ package on sys.path
from benchmarks import harness  # noqa: E402
from benchmarks import prefix_attention_cases as cases  # noqa: E402

RECORD_FIELDS = {"bench", "provider", "device", "commit", "config", "ms", "tflops", "gbps", "peak_mem_mb"}


def _expected_providers(suite: harness.Suite) -> set:
    inputs = cases.make_inputs(suite.cases[0], suite.device)
    fused, _ = cases.fused_backends(suite.cases[0], inputs)
    return {"torch", "sdpa_concat", *fused}


def test_bench_quick_writes_records_and_plot(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--reps", "3"]) == 0
    suite = cases.SUITES[runner.default_suite(quick=True)]
    records = json.loads((tmp_path / f"{suite.name}.json").read_text())
    assert {f.name for f in fields(harness.Record)} == RECORD_FIELDS
    assert records and all(set(r) == RECORD_FIELDS for r in records)
    expected = _expected_providers(suite)
    if suite.device == "cpu" and "cpu" in softprompt_kernels.available_backends():
        assert "cpu" in expected
    for case in suite.cases:
        got = {r["provider"] for r in records if r["config"]["name"] == case.name}
        assert got == expected, case.name
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0 for r in records)
    assert all(r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0 for r in records)
    assert (tmp_path / f"{suite.name}.png").stat().st_size > 1000
    table = capsys.readouterr().out.rstrip().splitlines()
    assert "speed-up vs torch" in "\n".join(table[-len(suite.cases) - 4:])  # the table comes last


def _brute_force_flops(case: cases.Case) -> int:
    visible = 0
    for i in range(case.Lq):
        visible += case.K  # the prefix is never masked
        visible += sum(1 for j in range(case.Lk) if not case.causal or j <= i + case.Lk - case.Lq)
    return 4 * case.B * case.Hq * case.D * visible


@pytest.mark.parametrize("Lq,Lk,causal", [(5, 5, True), (3, 7, True), (1, 9, True), (4, 6, False)])
def test_flop_count_matches_brute_force(Lq, Lk, causal):
    case = cases.Case(B=2, Hq=3, Hkv=1, Lq=Lq, Lk=Lk, K=4, D=8, causal=causal)
    assert cases.forward_flops(case) == _brute_force_flops(case)
    assert cases.flops(case) == _brute_force_flops(case)
    assert cases.flops(cases.Case(**{**case.__dict__, "mode": "fwd_bwd"})) == 3.5 * _brute_force_flops(case)


@pytest.mark.parametrize("num_prompts", [1, 3])
def test_sdpa_concat_matches_torch_provider(num_prompts):
    case = cases.Case(B=6, Hq=4, Hkv=2, Lq=5, Lk=9, K=3, D=8, causal=True, num_prompts=num_prompts)
    setup = cases.build(case, "cpu", only=["torch", "sdpa_concat"])
    torch.testing.assert_close(setup.providers["sdpa_concat"](), setup.providers["torch"](),
                               rtol=1e-5, atol=1e-5)
    grads = cases.build(cases.Case(**{**case.__dict__, "mode": "fwd_bwd"}), "cpu",
                        only=["torch", "sdpa_concat"]).providers
    dq_concat, dq_torch = grads["sdpa_concat"]()[0], grads["torch"]()[0]
    torch.testing.assert_close(dq_concat, dq_torch, rtol=1e-5, atol=1e-5)


def test_interleaved_timing_and_cpu_peak_memory():
    timing = harness.Timing(reps=3, warmup=1, min_time_s=0.0)
    ms = harness.time_interleaved({"a": lambda: torch.ones(10), "b": lambda: torch.ones(1000)}, "cpu", timing)
    assert set(ms) == {"a", "b"} and all(t > 0 for t in ms.values())
    peak = harness.peak_memory_mb(lambda: torch.empty(4 << 20, dtype=torch.uint8), "cpu")
    assert peak is None or 4.0 <= peak < 4.5


def test_table_reports_speedup_against_torch():
    def record(provider, ms):
        return harness.Record("op", provider, "dev", "abc", {"name": "case-1"}, ms, 1.0, 1.0, 2.0)

    table = harness.format_table([record("torch", 4.0), record("fast", 2.0)])
    row = table.splitlines()[-1]
    assert row.startswith("case-1") and "2.00" in row and "4.000" in row


def test_bench_without_checkout_explains(tmp_path, capsys, monkeypatch):
    import softprompt_kernels.cli as cli

    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)  # a directory without benchmarks/
    assert main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_insertion_bench_cases_build_and_run_on_cpu():
    from benchmarks import insertion_cases

    for case in insertion_cases.SUITES["insertion-cpu-quick"].cases:
        setup = insertion_cases.build(case, torch.device("cpu"))
        assert set(setup.providers) >= {"torch", "cpu"}
        results = {name: fn() for name, fn in setup.providers.items()}
        if case.mode == "fwd":
            torch.testing.assert_close(results["cpu"], results["torch"])
