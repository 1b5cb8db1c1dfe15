"""The CUDA kernels' logic on the CPU: csrc/cuda/*.cuh compiled by the host compiler with the SIMT
emulator (tests/cuda_emulation), compared with the float64 oracle. Catches indexing, masking, split
and combine errors, and misplaced barriers (a divergent __syncthreads hangs the emulator as it would
a GPU), on machines without a GPU. Every call goes through the CUDA binding's own dispatch
(csrc/prefix_attention/cuda_forward.h), so the decode/prefill choice, layouts and workspace are covered too.
Real-GPU checks are in test_cuda_gpu.py."""
import math

import pytest
import torch

import cuda_emulation
from oracle import oracle_prefix_attention

pytestmark = pytest.mark.slow  # compiles the kernels with the host compiler first (about a minute)


@pytest.fixture(scope="module")
def emulated():
    return cuda_emulation.load()


def _case(B, Hq, Hkv, Lq, Lk, P, K, D, dtype, seed=0, prompt_ids=None, prefix_lens=None, padding=None,
          hf_layout=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if hf_layout:  # what Hugging Face hands over: [B, L, H, D] transposed
        q = rand(B, Lq, Hq, D).transpose(1, 2)
        k, v = rand(B, Lk, Hkv, D).transpose(1, 2), rand(B, Lk, Hkv, D).transpose(1, 2)
    else:
        q, k, v = rand(B, Hq, Lq, D), rand(B, Hkv, Lk, D), rand(B, Hkv, Lk, D)
    kwargs = {
        "prompt_ids": None if prompt_ids is None else torch.tensor(prompt_ids),
        "prefix_lens": None if prefix_lens is None else torch.tensor(prefix_lens),
        "key_padding_mask": None if padding is None else padding,
    }
    return [q, k, v, rand(P, Hkv, K, D), rand(P, Hkv, K, D)], kwargs


def _left_padding(B, Lk, lengths):
    return torch.arange(Lk)[None, :] >= (Lk - torch.tensor(lengths))[:, None]


def _check(out, lse, tensors, kwargs, causal, dtype, probabilities_rounded=False):
    ref_out, ref_lse = oracle_prefix_attention(*tensors, causal=causal, **kwargs)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding of the output to the half type
    if probabilities_rounded:  # tensor-core P.V takes the probabilities in the half type, as FlashAttention does
        tol *= 2
    err = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    assert err <= tol, f"max |out - oracle| = {err}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.all(lse[~finite] == -math.inf)
    if finite.any():
        lse_err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
        assert lse_err <= 1e-4, f"max |lse - oracle| = {lse_err}"
    assert torch.all(out[~finite] == 0)


DECODE_CASES = [
    # name, (B, Hq, Hkv, Lq, Lk, P, K, D), causal, splits, extra
    ("gqa-multi-prompt-left-pad", (3, 4, 2, 1, 70, 3, 5, 64), True, 1,
     dict(prompt_ids=[-1, 0, 2], prefix_lens=[5, 0, 3], padding=_left_padding(3, 70, [70, 41, 3]))),
    ("gqa-multi-prompt-3-splits", (3, 4, 2, 1, 70, 3, 5, 64), True, 3,
     dict(prompt_ids=[-1, 0, 2], prefix_lens=[5, 0, 3], padding=_left_padding(3, 70, [70, 41, 3]))),
    ("spec-decode-Lq3-two-query-tiles", (2, 8, 2, 3, 90, 1, 0, 128), True, 2, {}),
    ("mha-D256-hf-layout", (2, 2, 2, 1, 150, 2, 7, 256), True, 0, dict(prompt_ids=[1, 0], hf_layout=True)),
    ("full-Lq16-random-padding", (2, 2, 1, 16, 40, 1, 66, 64), False, 2,
     dict(padding=torch.rand(2, 40, generator=torch.Generator().manual_seed(3)) > 0.4)),
    ("prefix-only-split-boundary", (1, 4, 1, 1, 1, 1, 128, 128), True, 3, {}),
    # no sequence keys at all (Lk = 0, non-causal: ADAPTION_PROMPT's separate softmax), over two splits
    ("no-sequence-keys-Lk0", (3, 4, 2, 5, 0, 3, 70, 64), False, 2,
     dict(prompt_ids=[1, -1, 2], prefix_lens=[9, 70, 0])),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, shape, causal, splits, extra", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_kernel_matches_oracle(emulated, name, shape, causal, splits, extra, dtype):
    tensors, kwargs = _case(*shape, dtype, **extra)
    scale = shape[-1] ** -0.5
    out, lse = emulated.forward(*tensors, **kwargs, causal=causal, scale=scale, num_splits=splits, num_sms=4)
    _check(out, lse, tensors, kwargs, causal, dtype)


FEATURES = {"window-5": dict(window=5), "window-70": dict(window=70), "softcap": dict(softcap=0.5),
            "sinks": dict(sinks=True), "all": dict(window=9, softcap=2.0, sinks=True),
            "offsets": dict(window=12, offsets=True)}


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name, shape, causal, _, extra", [DECODE_CASES[1], DECODE_CASES[2], DECODE_CASES[4]],
                         ids=[DECODE_CASES[i][0] for i in (1, 2, 4)])
def test_decode_kernel_features_match_oracle(emulated, name, shape, causal, _, extra, feature, splits):
    """Sliding window (tiles before the reach skipped, per-query masks), soft-capping and sinks (in the
    single split's epilogue and in the combine pass)."""
    tensors, kwargs = _case(*shape, torch.bfloat16, **extra)
    features = dict(FEATURES[feature])
    if features.pop("sinks", False):
        features["sinks"] = torch.randn(shape[1], generator=torch.Generator().manual_seed(9))
    if features.pop("offsets", False):  # each row's prefix after some of its keys (serving's left padding)
        features["prefix_offsets"] = torch.arange(shape[0]) * 7 % (shape[4] + 1)
    out, lse = emulated.forward(*tensors, **kwargs, causal=causal, num_splits=splits, num_sms=4, **features)
    if "sinks" in features:  # a query that sees nothing has lse = its sink, not -inf
        ref_out, ref_lse = oracle_prefix_attention(*tensors, causal=causal, **kwargs, **features)
        assert (out.double() - ref_out).abs().max().item() <= 1e-2
        torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-4)
    else:
        _check(out, lse, tensors, dict(kwargs, **features), causal, torch.bfloat16)


def test_decode_rows_that_see_nothing_get_zeros_and_minus_inf(emulated):
    padding = torch.tensor([[False] * 20, [True] * 20])
    tensors, kwargs = _case(2, 2, 2, 1, 20, 1, 4, 64, torch.bfloat16, prompt_ids=[-1, 0], padding=padding)
    for splits in (1, 2):
        out, lse = emulated.forward(*tensors, prompt_ids=kwargs["prompt_ids"], key_padding_mask=padding, causal=True,
                                    scale=0.125, num_splits=splits, num_sms=1)
        assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
        _check(out, lse, tensors, kwargs, True, torch.bfloat16)


def test_decode_out_of_range_prompt_gives_nan_rows_not_a_crash(emulated):
    tensors, _ = _case(2, 2, 1, 1, 16, 2, 4, 64, torch.bfloat16)
    for splits in (1, 2):
        out, lse = emulated.forward(*tensors, prompt_ids=torch.tensor([0, 7]), scale=0.125, num_splits=splits, num_sms=1)
        assert torch.isnan(out[1].float()).all() and torch.isnan(lse[1]).all()
        assert torch.isfinite(out[0].float()).all()


def test_cases_cover_both_sides_of_the_decode_prefill_choice(emulated):
    limit = emulated.decode_max_queries()
    assert limit == 16
    assert max(case[1][3] for case in DECODE_CASES) == limit  # Lq = 16 still decodes
    assert min(case[1][3] for case in PREFILL_CASES) > limit


def test_dispatch_rejects_what_the_kernels_cannot_run(emulated):
    tensors, _ = _case(1, 2, 1, 1, 8, 1, 2, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        emulated.forward(*(t.float() for t in tensors), scale=0.1)
    tensors, _ = _case(1, 2, 1, 1, 8, 1, 2, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="head dims 64, 128 and 256"):
        emulated.forward(*tensors, scale=0.1)


def test_decode_plan_fills_the_gpu_and_keeps_splits_long(emulated):
    # B=1 at cache 32768 on 132 SMs: split so that ~2 waves of blocks run; B=64: no split needed.
    splits, per_split, qb, tiles = emulated.decode_plan(1, 32, 8, 1, 32768, 128, 132)
    assert splits * 8 >= 132 and per_split % 64 == 0 and splits * per_split >= 32768 + 128
    assert (qb, tiles) == (4, 1)
    assert emulated.decode_plan(64, 32, 8, 1, 4096, 128, 132)[0] == 1
    assert emulated.decode_plan(1, 32, 8, 1, 64, 0, 132)[0] == 1  # short rows stay whole


PREFILL_CASES = [
    # name, (B, Hq, Lq... as above), causal, extra
    ("causal-gqa-multi-prompt-left-pad", (3, 4, 2, 70, 70, 3, 20, 64), True,
     dict(prompt_ids=[1, -1, 2], prefix_lens=[20, 0, 9], padding=_left_padding(3, 70, [70, 50, 5]))),
    ("chunked-prefill-Lq-lt-Lk", (1, 2, 1, 65, 100, 1, 33, 128), True, {}),
    ("full-random-padding-hf-layout", (2, 2, 2, 40, 40, 1, 0, 64), False,
     dict(hf_layout=True, padding=torch.rand(2, 40, generator=torch.Generator().manual_seed(5)) > 0.3)),
    ("D256-prefix-over-two-tiles", (1, 2, 1, 20, 20, 2, 40, 256), True, dict(prompt_ids=[1])),
    ("no-sequence-keys-Lk0", (2, 4, 2, 40, 0, 2, 30, 64), False, dict(prompt_ids=[1, -1], prefix_lens=[30, 7])),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, shape, causal, extra", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_prefill_kernel_matches_oracle(emulated, name, shape, causal, extra, dtype):
    tensors, kwargs = _case(*shape, dtype, **extra)
    out, lse = emulated.forward(*tensors, **kwargs, causal=causal)
    _check(out, lse, tensors, kwargs, causal, dtype, probabilities_rounded=True)


def test_prefill_rows_that_see_nothing_and_bad_prompts(emulated):
    padding = torch.tensor([[False] * 18, [True] * 18, [True] * 18])
    tensors, kwargs = _case(3, 2, 1, 18, 18, 1, 4, 64, torch.bfloat16, prompt_ids=[-1, 0, 0], padding=padding)
    out, lse = emulated.forward(*tensors, prompt_ids=kwargs["prompt_ids"], key_padding_mask=padding, causal=False,
                                scale=0.125)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
    _check(out, lse, tensors, kwargs, False, torch.bfloat16, probabilities_rounded=True)
    out, lse = emulated.forward(*tensors, prompt_ids=torch.tensor([0, 3, -1]), scale=0.125)
    assert torch.isnan(out[1].float()).all() and torch.isfinite(out[0].float()).all()
