"""The `softprompt-kernels bench` command and the benchmark harness (fast: a few seconds)."""
import json
import sys
from dataclasses import fields

import pytest
import torch

import softprompt_kernels
from softprompt_kernels.bench import harness, run as runner
from softprompt_kernels.bench import prefix_attention as cases
from softprompt_kernels.cli import main

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
    header = "\n".join(table[-len(suite.cases) - 4:])  # the table comes last
    assert "speed-up vs torch" in header and "speed-up vs sdpa_concat" in header


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


def test_table_has_a_column_per_reference_provider():
    def record(provider, ms):
        return harness.Record("op", provider, "dev", "abc", {"name": "case-1"}, ms, 1.0, 1.0, None)

    table = harness.format_table([record("torch", 4.0), record("sdpa_concat", 3.0), record("cpu", 2.0)])
    assert "speed-up vs torch" in table and "speed-up vs sdpa_concat" in table and "peak MiB" not in table
    assert table.splitlines()[-1].split("|")[-1].split() == ["1.50"]  # cpu vs sdpa_concat


def test_commit_of_an_installed_package_names_its_release(tmp_path):
    assert harness.git_commit(tmp_path) == f"release-{softprompt_kernels.__version__}"


def test_every_suite_follows_the_protocol():
    for name, module in runner.all_suites().items():
        suite = module.SUITES[name]
        assert suite.name == name and suite.device in ("cpu", "cuda") and suite.cases
        assert isinstance(module.BENCH, str) and module.CASE_KEY and module.known_providers()
        assert hasattr(module, "build") != hasattr(module, "measure"), module.__name__


def test_bench_help_lists_the_suites(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "serve-cpu" in out and "peft-cpu" in out and "(default: bench-out)" in out


def test_plot_says_what_its_axes_mean(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = {}
    for setter in ("set_xlabel", "set_ylabel"):
        original = getattr(matplotlib.axes.Axes, setter)

        def spy(self, text, *args, _original=original, _setter=setter, **kwargs):
            labels.setdefault(_setter, []).append(text)
            return _original(self, text, *args, **kwargs)
        monkeypatch.setattr(matplotlib.axes.Axes, setter, spy)
    records = [harness.Record("op", p, "dev", "abc", {"name": "B2 L8"}, ms, 1.0, 1.0, None)
               for p, ms in (("torch", 2.0), ("cpu", 1.0))]
    harness.plot(records, tmp_path / "p.png", case_key="B = rows, L = length")
    assert [t for t in labels["set_xlabel"] if t] == ["case: B = rows, L = length"]
    assert [t for t in labels["set_ylabel"] if t] and all("higher is better" in t for t in labels["set_ylabel"] if t)


def test_plot_footnote_fits_in_the_figure(tmp_path, monkeypatch):
    """A case key longer than the figure is wide is wrapped, and every line of it is inside the saved image."""
    import matplotlib.figure

    from softprompt_kernels.bench import prefix_attention

    saved = []
    original = matplotlib.figure.Figure.savefig

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        label = self.axes[1].xaxis.label  # measured as saved (closing the figure drops its renderer)
        saved.append((label.get_text(), label.get_window_extent(self.canvas.get_renderer()), self.bbox))
        return result
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    long_key = prefix_attention.CASE_KEY + "; " + prefix_attention.CASE_KEY  # longer than any suite's
    for count in (1, 7):
        records = [harness.Record("op", p, "dev", "abc", {"name": f"B16 H8/4 L128/128 K100 D32 f32 case {i}"},
                                  ms, 1.0, 1.0, None)
                   for i in range(count) for p, ms in (("torch", 2.0), ("sdpa_concat", 1.5), ("cpu", 1.0))]
        harness.plot(records, tmp_path / f"p{count}.png", case_key=long_key)
        text, box, inside = saved[-1]
        assert " ".join(text.split()) == "case: " + long_key and "\n" in text
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
            (box, inside)


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["fastapi", "transformers"])
def test_serve_without_the_serve_extra_names_the_extra(module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # what an import sees when the package is not installed
    assert main(["serve", "--model", "unused"]) == 2
    err = capsys.readouterr().err
    assert f"needs {module}" in err and "pip install 'softprompt-kernels[serve]'" in err


def test_insertion_bench_cases_build_and_run_on_cpu():
    from softprompt_kernels.bench import insertion as insertion_cases

    for case in insertion_cases.SUITES["insertion-cpu-quick"].cases:
        setup = insertion_cases.build(case, torch.device("cpu"))
        assert set(setup.providers) >= {"torch", "cpu"}
        results = {name: fn() for name, fn in setup.providers.items()}
        if case.mode == "fwd":
            torch.testing.assert_close(results["cpu"], results["torch"])


@pytest.mark.parametrize("method", ["prompt", "prefix", "multitask", "cpt", "cartridge", "adaption"])
def test_peft_training_cases_build_and_run_one_step(method):
    pytest.importorskip("peft")
    from softprompt_kernels.bench import peft_training
    from softprompt_kernels.hf.accelerate import SUPPORTED_METHODS

    tiny = peft_training.SUITES["peft-cpu-quick"].cases[0]
    case = peft_training.replace(tiny, method=method, k=30 if method == "cpt" else tiny.k)  # CPT: a whole example
    setup = peft_training.build(case, torch.device("cpu"))
    if peft_training.METHODS[method] not in SUPPORTED_METHODS:
        assert setup.providers == {} and "not accelerated yet" in next(iter(setup.skipped.values()))
        return
    assert set(setup.providers) == {"bare", "peft", "accelerated"}
    grads = {name: fn() for name, fn in setup.providers.items()}
    assert all(g and all(torch.isfinite(x).all() for x in g) for g in grads.values())
    for got, want in zip(grads["accelerated"], grads["peft"], strict=True):  # the same step as PEFT's
        assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_peft_cpu_suite_has_every_method_at_the_acceptance_size():
    from softprompt_kernels.bench import peft_training

    llama = [c for c in peft_training.SUITES["peft-cpu"].cases if c.family == "llama"]
    assert {c.method for c in llama} == set(peft_training.METHODS)
    assert {(c.B, c.n, c.k, c.hidden, c.layers) for c in llama} == {(16, 128, 100, 256, 4)}


def test_peft_training_goals_per_method():
    from softprompt_kernels.bench import peft_training

    def records(method, peft_ms):
        config = {"name": method, "method": method}
        return [harness.Record("b", p, "cpu", "c", config, ms, 1.0, 1.0, None)
                for p, ms in (("bare", 90.0), ("peft", peft_ms), ("accelerated", 100.0))]

    lines = peft_training.goals([r for m, ms in (("multitask", 170.0), ("cpt", 150.0), ("cartridge", 115.0),
                                                 ("adaption", 120.0)) for r in records(m, ms)])
    assert lines == ["multitask: 1.70x faster than PEFT (goal >= 1.6x: met)",
                     "cpt: 1.50x faster than PEFT (goal >= 1.6x: NOT met)",
                     "cartridge: 1.15x faster than PEFT (goal >= 1.1x: met)",
                     "adaption: 1.20x faster than PEFT, 1.11x the bare model's time (no goal)"]


def test_kill_process_tree_reaches_children_in_sessions_of_their_own():
    """What torchrun does: each rank in a new session, so a process-group kill of torchrun misses it."""
    import subprocess
    import sys
    import time

    import psutil

    spawn = ("import subprocess, sys, time; "
             "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
             "print(c.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    assert child.is_running() and child.ppid() == parent.pid
    started = time.monotonic()
    harness.kill_process_tree(parent.pid)
    assert parent.wait(timeout=10) != 0
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() - started < 15
    parent.stdout.close()
    harness.kill_process_tree(parent.pid)  # gone already: nothing to do, no error
