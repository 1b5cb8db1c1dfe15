"""The parity matrix: accelerate() against PEFT on causal-LM families of transformers, built as tiny random
models from each family's own config (tests/hf_families.py), with their sliding windows shorter than
prefix + text and strong logit soft-capping where they have them.

For every family x {prompt tuning, P-tuning, prefix tuning} x {left, right padding}: loss, text logits
and every trainable gradient equal PEFT's (rel 1e-4), and the project's kernels ran. Per family: greedy
generate() equals a greedy loop over PEFT's forward, and where the family has a window, soft-capping or
sinks, turning the feature off changes the logits (so the matrix tests the feature, not a no-op).
Families the op cannot express are refused with their reason.
"""
import copy

import pytest
import torch

pytest.importorskip("peft")

from peft import get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_families import tiny_causal_lm  # noqa: E402
from hf_models import padded_batch  # noqa: E402
from softprompt_kernels.hf.families import TESTED_DECODERS, UnsupportedModelError  # noqa: E402
from test_hf_peft_parity import METHODS, greedy_loop, loss_logits_grads, relative  # noqa: E402

FAMILIES = sorted(TESTED_DECODERS)
# The families of the quick tier (make test-quick); the whole matrix runs in make test.
QUICK = {"llama", "gemma2", "gemma3_text", "gpt_oss", "phi3", "qwen3_moe"}
REFUSED = {
    "deepseek_v3": "multi-head latent attention", "qwen3_next": "linear_attention", "llama4_text": "chunked",
    "minimax": "linear_attention", "diffllama": "differential attention", "bloom": "ALiBi",
    "bart": "encoder-decoder", "xlm-roberta": "bidirectional encoder", "stablelm": "AttentionInterface",
}


def _params(families, with_methods=True):
    out = []
    for family in families:
        marks = [] if family in QUICK else [pytest.mark.slow]
        if with_methods:
            out += [pytest.param(family, method, left, marks=marks, id=f"{family}-{method}-{'left' if left else 'right'}")
                    for method in ("prompt", "p-tuning-mlp", "prefix") for left in (True, False)]
        else:
            out.append(pytest.param(family, marks=marks, id=family))
    return out


def _peft(model_type, method, seed=0, **overrides):
    model = get_peft_model(tiny_causal_lm(model_type, seed=seed, **overrides), METHODS[method]())
    with torch.no_grad():  # PEFT initialises some encoders to zero: make the prompt matter
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model


def _kernel_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if "softprompt_kernels::" in e.key)


@pytest.mark.parametrize("model_type, method, left", _params(FAMILIES))
def test_equals_peft(model_type, method, left):
    model = _peft(model_type, method)
    ids, mask = padded_batch(left=left)
    loss, logits, grads = loss_logits_grads(model, ids, mask)
    sk.accelerate(model)
    calls = _kernel_calls(lambda: loss_logits_grads(model, ids, mask))
    loss2, logits2, grads2 = loss_logits_grads(model, ids, mask)
    real = mask.bool()
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2[real], logits[real]) <= 1e-4
    assert len(grads2) == len(grads) and all(relative(g2, g) <= 1e-4 for g2, g in zip(grads2, grads))
    assert calls > 0, "the accelerated model never called the project's kernels"


@pytest.mark.parametrize("model_type", _params(FAMILIES, with_methods=False))
def test_generate_equals_greedy_loop_over_peft_forward(model_type):
    for method in ("prompt", "prefix"):
        model = _peft(model_type, method, seed=3)
        ids, mask = padded_batch(left=True)
        expected = greedy_loop(model, ids, mask, steps=5)
        sk.accelerate(model)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)[:, ids.shape[1]:]
        assert torch.equal(generated, expected), method


FEATURE_OFF = {"sliding_window": dict(sliding_window=10_000),  # longer than any sequence here: no window
               "attn_logit_softcapping": dict(attn_logit_softcapping=None)}


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gemma3_text", "cohere2", "gpt_oss", "starcoder2",
                                        "phi3", "vaultgemma"])
def test_the_features_matter(model_type):
    """The window, soft-capping or sinks of the family change the accelerated logits: they are really applied."""
    ids, mask = padded_batch(left=False)
    model = sk.accelerate(_peft(model_type, "prefix"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    config = model.get_base_model().config
    changed = []
    for name, off in FEATURE_OFF.items():
        if getattr(config, name, None) is None:
            continue
        other = sk.accelerate(_peft(model_type, "prefix", **off))
        with torch.no_grad():
            other_logits = other(input_ids=ids, attention_mask=mask).logits
        changed.append((name, relative(other_logits, logits)))
    sinks = [m for n, m in model.named_modules() if hasattr(m, "sinks")]
    if sinks:
        with torch.no_grad():
            for m in sinks:
                m.sinks.fill_(-1e4)  # a sink that never takes weight
            changed.append(("sinks", relative(model(input_ids=ids, attention_mask=mask).logits, logits)))
    assert changed, f"{model_type} has none of the features"
    assert all(diff > 1e-3 for _, diff in changed), changed


@pytest.mark.parametrize("model_type, reason", sorted(REFUSED.items()))
def test_refused_families_name_their_reason(model_type, reason):
    from transformers import AutoConfig

    from softprompt_kernels.hf.families import family_of

    # the AttentionInterface check needs the model class: build the tiny model for it
    model = tiny_causal_lm(model_type) if reason == "AttentionInterface" else None
    config = model.config if model is not None else AutoConfig.for_model(model_type)
    with pytest.raises(UnsupportedModelError, match=f"model_type {model_type!r} cannot be accelerated: .*{reason}"):
        family_of(config, model)


def test_an_untested_family_warns_once():
    from transformers import AutoConfig

    from softprompt_kernels.hf.families import family_of

    config = AutoConfig.for_model("cwm")
    with pytest.warns(UserWarning, match="not in its tested parity matrix"):
        assert family_of(config).causal
