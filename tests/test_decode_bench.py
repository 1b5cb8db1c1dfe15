"""The decode and prefill benchmark modules on the CPU: cases build, the torch provider runs, the
GPU backends are skipped with their reasons, and the lines of the decode goals (docs/DESIGN.md section 7)
are computed from records (GPU numbers come from benchmarks/device_check.sh on a lent GPU)."""
import torch

from softprompt_kernels.bench import decode as decode_cases
from softprompt_kernels.bench import harness
from softprompt_kernels.bench import prefix_attention as prefix_attention_cases


def _record(provider, case, ms, gbps=0.0, mode=None):
    config = case.config() if hasattr(case, "config") else dict(case)
    if mode:
        config["mode"] = mode
    return harness.Record(bench="b", provider=provider, device="d", commit="c", config=config, ms=ms,
                          tflops=0.0, gbps=gbps, peak_mem_mb=None)


def test_decode_case_builds_on_cpu_and_skips_gpu_backends_with_reasons():
    case = decode_cases.DecodeCase(B=2, Lk=64, num_prompts=4, K=8, Hq=4, Hkv=2, D=64)
    setup = decode_cases.build(case, torch.device("cpu"))
    assert "torch" in setup.providers and "cuda" in setup.skipped
    out = setup.providers["torch"]()
    assert out.shape == (2, 4, 1, 64)
    # bytes: each distinct prompt (2 of the bank's 4 are used) counted once
    elem = 2
    assert setup.bytes == (2 * 2 * 2 * 64 * 64 + 2 * 2 * 2 * 8 * 64 + 2 * 2 * 4 * 64) * elem


def test_decode_goals_report_met_and_not_met():
    copy = _record("device_copy", decode_cases.CopyCase(), 1.0, gbps=3000.0)
    recs = [copy]
    for B in (1, 8, 64):
        recs.append(_record("cuda", decode_cases.DecodeCase(B=B, Lk=32768), 1.0, gbps=2400.0 if B == 64 else 1500.0))
    recs.append(_record("cuda", decode_cases.DecodeCase(B=64, Lk=4096), 1.0))
    recs.append(_record("cuda", decode_cases.DecodeCase(B=64, Lk=4096, num_prompts=64), 1.2))
    recs.append(_record("torch", decode_cases.DecodeCase(B=64, Lk=4096), 4.0))
    lines = decode_cases.goals(recs)
    assert any("B64 cache 32768" in l and "80% of copy" in l and "met)" in l for l in lines)
    assert any("B1 cache 32768" in l and "NOT met" in l for l in lines)
    assert any("64 prompts / 1 prompt = 1.20x" in l and "NOT met" in l for l in lines)
    assert any("vs torch B64 cache 4096 P1: 4.00x" in l and "NOT met" not in l for l in lines)


def test_prefill_goal_compares_cuda_with_triton_forward():
    case = prefix_attention_cases.Case(B=1, Hq=2, Hkv=1, Lq=64, Lk=64, K=8, D=64, dtype="bfloat16")
    recs = [_record("triton", case, 1.0), _record("cuda", case, 1.3)]
    (line,) = prefix_attention_cases.goals(recs)
    assert "1.30x" in line and "NOT met" in line
    assert [c.mode for c in prefix_attention_cases.SUITES["prefill-gpu"].cases] == ["fwd"] * 5
