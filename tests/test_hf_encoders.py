"""Encoders (BERT, RoBERTa): sequence and token classification for all three methods."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import ENCODERS, padded_batch, tiny_model  # noqa: E402

K = 4
NUM_LABELS = 3


def peft_encoder(model_type, method, task, seed=0):
    head = {"SEQ_CLS": "seq_cls", "TOKEN_CLS": "token_cls"}[task]
    base = tiny_model(model_type, head, seed=seed, num_labels=NUM_LABELS)
    config = {"prefix": lambda: PrefixTuningConfig(task_type=task, num_virtual_tokens=K),
              "prompt": lambda: PromptTuningConfig(task_type=task, num_virtual_tokens=K),
              "p-tuning": lambda: PromptEncoderConfig(task_type=task, num_virtual_tokens=K, encoder_hidden_size=32)}
    model = get_peft_model(base, config[method]())
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model


def batch(task, left):
    ids, mask = padded_batch(left=left)
    gen = torch.Generator().manual_seed(5)
    if task == "SEQ_CLS":
        labels = torch.randint(0, NUM_LABELS, (ids.shape[0],), generator=gen)
    else:
        labels = torch.randint(0, NUM_LABELS, ids.shape, generator=gen).masked_fill(mask == 0, -100)
    return ids, mask, labels


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def assert_same_results(out, grads, ref_logits, ref_loss, ref_grads, rtol=1e-4):
    """Logits, loss and every trainable parameter's gradient equal the reference (relative rtol)."""
    assert relative(out.logits, ref_logits) <= rtol
    assert abs(out.loss - ref_loss).item() <= rtol * ref_loss.item()
    for g, r in zip(grads, ref_grads):
        assert relative(g, r) <= rtol


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("method", ["prompt", "p-tuning"])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_sequence_classification_prompt_methods_equal_peft(model_type, method, left):
    model = peft_encoder(model_type, method, "SEQ_CLS")
    ids, mask, labels = batch("SEQ_CLS", left)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref_grads = torch.autograd.grad(ref.loss, trainable(model))
    sk.accelerate(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    grads = torch.autograd.grad(out.loss, trainable(model))
    assert_same_results(out, grads, ref.logits, ref.loss, ref_grads)


@pytest.mark.parametrize("method", ["prompt", "p-tuning"])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_token_classification_prompt_methods_line_up_with_text(model_type, method):
    model = peft_encoder(model_type, method, "TOKEN_CLS")
    ids, mask, labels = batch("TOKEN_CLS", left=False)
    ref_logits = model(input_ids=ids, attention_mask=mask).logits[:, K:]  # PEFT scores the prompt rows too
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, NUM_LABELS), labels.reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref_loss, trainable(model))
    sk.accelerate(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (*ids.shape, NUM_LABELS)
    grads = torch.autograd.grad(out.loss, trainable(model))
    assert_same_results(out, grads, ref_logits, ref_loss, ref_grads)


# Prefix tuning on encoders: PEFT itself fails with current transformers, so the reference is written
# here independently: every layer's K/V get the row's prefix concatenated in front (expanded over the
# batch, like PEFT's cache), plain SDPA with the padding mask extended by the always-visible prefix, and
# text positions numbered after the prefix as transformers 4.x did (BERT: k + index; RoBERTa:
# padding_idx + k + running count of real tokens).

def _reference_prefix_forward(model, per_layer, ids, mask, labels):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    k = per_layer[0][0].shape[2]

    def concat_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        pk, pv = per_layer[module.layer_idx]
        key = torch.cat([pk.expand(query.shape[0], -1, -1, -1), key], 2)
        value = torch.cat([pv.expand(query.shape[0], -1, -1, -1), value], 2)
        full = torch.cat([torch.ones_like(attention_mask[:, :k]), attention_mask], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=full.bool(), scale=scaling)
        return out.transpose(1, 2), None

    AttentionInterface.register("test_concat_prefix", concat_attention)
    AttentionMaskInterface.register("test_concat_prefix", lambda *a, attention_mask=None, **kw: attention_mask.bool())
    previous = model.config._attn_implementation
    model.set_attn_implementation("test_concat_prefix")
    if model.config.model_type == "roberta":
        positions = (k + mask.cumsum(-1)) * mask + model.config.pad_token_id
    else:
        positions = k + torch.arange(ids.shape[1])[None].expand_as(ids)
    try:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_prefix_tuning_on_encoders_matches_the_concatenated_reference(model_type, task):
    model = peft_encoder(model_type, "prefix", task)
    ids, mask, labels = batch(task, left=False)
    config = model.active_peft_config
    raw = model.prompt_encoder["default"].embedding.weight  # [k, layers * 2 * hidden]
    heads, dim = config.num_attention_heads, config.token_dim // config.num_attention_heads
    kv = raw.view(K, config.num_layers * 2, heads, dim).permute(1, 2, 0, 3)
    per_layer = [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(config.num_layers)]
    ref = _reference_prefix_forward(model.get_base_model(), per_layer, ids, mask, labels)
    ref_grads = torch.autograd.grad(ref.loss, trainable(model))
    sk.accelerate(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    grads = torch.autograd.grad(out.loss, trainable(model))
    assert_same_results(out, grads, ref.logits, ref.loss, ref_grads)


def test_insert_prompt_gradients():
    ids = torch.tensor([[3, 4, 0], [5, 5, 6]])
    weight = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    prompt = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = sk.insert_prompt(ids, weight, prompt)
    expected = torch.cat([prompt.expand(2, -1, -1), weight[ids]], 1)
    torch.testing.assert_close(out, expected)
    torch.autograd.gradcheck(lambda w, p: sk.insert_prompt(ids, w, p), (weight, prompt))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_adapter_names_on_an_encoder_is_an_error_not_ignored(method):
    """Rows naming adapters is a causal-decoder feature; an encoder used to pass it to the base model, which ignored
    it (every row then used the active adapter)."""
    model = sk.accelerate(peft_encoder(ENCODERS[0], method, "SEQ_CLS"))
    ids, mask, _ = batch("SEQ_CLS", left=False)
    with pytest.raises(ValueError, match=r"adapter_names \(one adapter per row\) is supported on causal decoders"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["default"] * ids.shape[0])
