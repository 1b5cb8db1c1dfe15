"""pytest-benchmark view of the quick CPU cases: ``python -m pytest benchmarks/test_bench_cpu.py --benchmark-only``.

The interleaved runner (``softprompt-kernels bench``) is the one that gives robust ratios;
this file lets pytest-benchmark's statistics, comparisons and histograms be used on the
same cases and providers.
"""
import pytest

import softprompt_kernels
from softprompt_kernels.bench import prefix_attention as cases

PROVIDERS = ("torch", "sdpa_concat", "cpu")
CASES = cases.SUITES["cpu-quick"].cases


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-").replace("/", "_") for c in CASES])
def test_prefix_attention_cpu(benchmark, case, provider):
    if provider not in ("torch", "sdpa_concat") and provider not in softprompt_kernels.available_backends():
        pytest.skip(f"backend {provider!r} is not available: {softprompt_kernels.backend_status()[provider]}")
    setup = cases.build(case, "cpu", only=[provider])
    fn = setup.providers[provider]
    benchmark.group = case.name
    benchmark.extra_info.update(config=setup.config, flops=setup.flops, bytes=setup.bytes)
    benchmark.pedantic(fn, rounds=50, iterations=1, warmup_rounds=3)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["tflops"] = setup.flops / seconds / 1e12
