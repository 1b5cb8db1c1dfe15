"""CPT (context-aware prompt tuning) on causal decoders: the shared-prompt reformulation with CPT's own loss
(context tokens predicted too, token-type masks, decaying weights per label group): loss, text logits and the
gradient of the trainable deltas equal PEFT's; greedy generation."""
import pytest
import torch

pytest.importorskip("peft")

from peft import CPTConfig, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402
from test_hf_peft_parity import greedy_loop, relative  # noqa: E402

# a context of two in-context examples: input template (1), input (2), output template (3), label (4), ...
CONTEXT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
TYPES = [1, 2, 2, 3, 4, 5, 6, 6, 7, 8]


def cpt_model(model_type="llama", decay="decay"):
    model = get_peft_model(tiny_model(model_type), CPTConfig(
        task_type="CAUSAL_LM", cpt_token_ids=CONTEXT, cpt_mask=[1] * len(CONTEXT), cpt_tokens_type_mask=TYPES,
        opt_weighted_loss_type=decay, opt_loss_decay_factor=0.8, opt_projection_epsilon=0.2,
        opt_projection_format_epsilon=0.1))
    with torch.no_grad():
        model.prompt_encoder["default"].delta_embedding.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return model


def batch(left):
    ids, mask = padded_batch(B=3, n=9, left=left)
    types = torch.zeros_like(ids)
    for row in range(3):
        real = mask[row].nonzero().flatten()
        # input template, input, output template, then the label tokens (type 4)
        pattern = [1, 2, 2, 3] + [4] * (len(real) - 4)
        types[row, real] = torch.tensor(pattern[: len(real)])
    return ids, mask, types


def run(model, ids, mask, types):
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, input_type_mask=types.clone())
    param = model.prompt_encoder["default"].delta_embedding.weight
    (grad,) = torch.autograd.grad(out.loss, [param])
    return out.loss.detach(), out.logits[:, -ids.shape[1]:].detach(), grad


@pytest.mark.parametrize("decay", ["decay", "none"])
@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_cpt_equals_peft(model_type, left, decay):
    model = cpt_model(model_type, decay)
    ids, mask, types = batch(left)
    loss, logits, grad = run(model, ids, mask, types)
    sk.accelerate(model)
    loss2, logits2, grad2 = run(model, ids, mask, types)
    real = mask.bool()
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2[real], logits[real]) <= 1e-4
    assert relative(grad2, grad) <= 1e-4
    assert grad2.abs().sum() > 0


def test_cpt_generate_equals_a_greedy_loop_over_peft():
    model = cpt_model()
    ids, mask, _ = batch(left=True)
    expected = greedy_loop(model, ids, mask, 5)
    sk.accelerate(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, -5:], expected)


def test_cpt_on_an_encoder_is_refused_with_the_reason():
    model = get_peft_model(tiny_model("bert"), CPTConfig(  # BertLMHeadModel
        task_type="CAUSAL_LM", cpt_token_ids=CONTEXT, cpt_mask=[1] * len(CONTEXT), cpt_tokens_type_mask=TYPES))
    with pytest.raises(sk.hf.AccelerationError, match="CPT on bert .*PEFT's CPT is for causal language models only"):
        sk.accelerate(model)
