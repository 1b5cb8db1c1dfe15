"""Every backend against the independent float64 oracle: outputs, lse and all five gradients."""
import pytest
import torch

from helpers import Case, assert_flash_rule, assert_matches_oracle, backend_results, cached_oracle_results

CPU_BACKENDS = ["torch", "cpu", "triton"]  # triton runs in the interpreter on CPU tensors (conftest)

FIXED_CASES = [
    Case(2, 4, 4, 9, 9, 1, 5, 16, name="mha-one-prompt"),
    Case(2, 6, 2, 13, 13, 1, 4, 24, name="gqa-odd-lengths-d24"),
    Case(3, 4, 1, 7, 7, 1, 3, 8, causal=False, name="mqa-noncausal"),
    Case(5, 4, 2, 6, 6, 3, 7, 12, prompt_ids=[2, -1, 0, 2, 1], prefix_lens=[0, 3, 7], name="multi-prompt-lens"),
    Case(4, 2, 2, 6, 6, 2, 4, 8, prompt_ids=[0, 1, -1, 1],
         padding=[[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1]],
         name="left-right-full-and-holey-padding"),
    Case(2, 2, 1, 5, 5, 1, 3, 8, padding=[[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
         name="fully-padded-row-still-sees-prefix"),
    Case(3, 4, 2, 1, 11, 2, 5, 16, prompt_ids=[1, 0, -1], padding=[[1] * 11, [0, 0] + [1] * 9, [1] * 10 + [0]],
         name="decode-lq1"),
    Case(2, 4, 2, 3, 9, 1, 4, 10, name="decode-lq3"),
    Case(2, 4, 2, 4, 10, 1, 4, 10, causal=False, name="lq-lt-lk-noncausal"),
    Case(2, 4, 2, 7, 7, 1, 0, 8, name="k-zero"),
    Case(3, 2, 2, 5, 5, 0, 3, 8, prompt_ids=[-1, -1, -1], name="empty-bank"),
    Case(2, 2, 2, 5, 5, 2, 4, 8, prompt_ids=[-1, -1], name="no-row-uses-a-prompt"),
    Case(2, 2, 1, 150, 150, 2, 130, 8, prompt_ids=[1, 0], prefix_lens=[130, 129],
         name="longer-than-one-key-block"),
    Case(1, 2, 2, 2, 3, 1, 2, 1, name="head-dim-one"),
    # More than 8 stacked (head, query) rows and one chunk fewer when gathered: the CPU forward gathers
    # chunks across prefix slots and sequence keys.
    Case(4, 8, 2, 6, 6, 2, 5, 8, prompt_ids=[0, 1, -1, 1], prefix_lens=[5, 2],
         padding=[[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1]],
         name="gathered-chunks-padded-multi-prompt"),
    Case(2, 4, 2, 20, 40, 1, 130, 8, padding=[[1] * 38 + [0, 0], [0] * 5 + [1] * 35],
         name="second-chunk-gathers-prefix-tail-and-keys"),  # chunks [0, 128) and [128, 170)
]


# The float64 oracle takes seconds on these: make test-quick leaves them out.
SLOW_CASES = {"longer-than-one-key-block", "second-chunk-gathers-prefix-tail-and-keys"}
CASE_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW_CASES else c for c in FIXED_CASES]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASE_PARAMS, ids=str)
def test_float32_matches_oracle(case, backend):
    assert_matches_oracle(backend_results(case, backend, torch.float32), cached_oracle_results(case), rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # triton takes no float64
@pytest.mark.parametrize("case", FIXED_CASES[:6], ids=str)
def test_float64_matches_oracle_tightly(case, backend):
    assert_matches_oracle(backend_results(case, backend, torch.float64), cached_oracle_results(case), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [FIXED_CASES[1], FIXED_CASES[4], FIXED_CASES[6]], ids=str)
def test_low_precision_cpu_kernel_within_torch_error(case, dtype):
    """FlashAttention's rule: error vs the float64 oracle at most 2x the torch path's error, plus a floor."""
    reference = cached_oracle_results(case)
    ours = backend_results(case, "cpu", dtype)
    baseline = backend_results(case, "torch", dtype)
    for name, a, b, ref in zip(["out", "lse", "dq", "dk", "dv", "dpk", "dpv"], ours, baseline, reference):
        assert_flash_rule(name, a, b, ref)


@pytest.mark.parametrize("case", [Case(2, 4, 2, 6, 6, 1, 3, 8, causal=False, name="blas-rows"),
                                  Case(2, 4, 2, 1, 6, 1, 3, 8, causal=False, name="decode-rows")], ids=str)
@pytest.mark.parametrize("where", ["key", "prefix"])
def test_nan_input_gives_nan_where_torch_does(case, where):
    """A NaN in a key must reach the outputs that attend to it (never silently dropped by the softmax)."""
    import softprompt_kernels as sk
    from helpers import make_inputs

    (q, k, v, pk, pv), kwargs = make_inputs(case, requires_grad=False)
    if where == "key":
        k = k.clone()
        k[0, 1, 2, 3] = float("nan")
    else:
        pk = pk.clone()
        pk[0, 0, 1, 0] = float("nan")
    expected = sk.prefix_attention(q, k, v, pk, pv, **kwargs, backend="torch")
    got = sk.prefix_attention(q, k, v, pk, pv, **kwargs, backend="cpu")
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
