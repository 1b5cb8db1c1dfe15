"""accelerate(peft_model) against PEFT itself: same loss, logits and gradients; correct generation."""
import pytest
import torch

pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import DECODERS, padded_batch, tiny_model  # noqa: E402

K = 5
METHODS = {
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K),
    "prefix-projection": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K,
                                                    prefix_projection=True, encoder_hidden_size=32),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K),
    "p-tuning-mlp": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, encoder_hidden_size=32),
    "p-tuning-lstm": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, encoder_hidden_size=32,
                                                 encoder_reparameterization_type="LSTM"),
}


def peft_model(model_type, method, seed=0):
    model = get_peft_model(tiny_model(model_type, seed=seed), METHODS[method]())
    with torch.no_grad():  # PEFT initialises some encoders to zero: make the prompt matter
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model


def loss_logits_grads(model, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return out.loss.detach(), out.logits[:, -ids.shape[1]:].detach(), grads


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("method", ["prefix", "prompt", "p-tuning-mlp"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_loss_logits_and_grads_equal_peft(model_type, method, left):
    model = peft_model(model_type, method)
    ids, mask = padded_batch(left=left)
    loss, logits, grads = loss_logits_grads(model, ids, mask)
    sk.accelerate(model)
    loss2, logits2, grads2 = loss_logits_grads(model, ids, mask)
    sk.restore(model)
    real = mask.bool()
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2[real], logits[real]) <= 1e-4
    for g2, g in zip(grads2, grads):
        assert relative(g2, g) <= 1e-4


@pytest.mark.parametrize("method", ["prefix-projection", "p-tuning-lstm"])
def test_encoder_variants_equal_peft(method):
    model = peft_model("llama", method)
    ids, mask = padded_batch()
    loss, _, grads = loss_logits_grads(model, ids, mask)
    sk.accelerate(model)
    loss2, _, grads2 = loss_logits_grads(model, ids, mask)
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    for g2, g in zip(grads2, grads):
        assert relative(g2, g) <= 1e-4


def greedy_loop(model, ids, mask, steps):
    """The definition: recompute the whole sequence with the model's forward at every step."""
    new = []
    for _ in range(steps):
        with torch.no_grad():
            token = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
        new.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(new, 1)


@pytest.mark.parametrize("method", ["prefix", "prompt", "p-tuning-mlp"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_generate_with_cache_equals_greedy_loop_over_peft_forward(model_type, method):
    model = peft_model(model_type, method, seed=3)
    ids, mask = padded_batch(left=True)
    expected = greedy_loop(model, ids, mask, steps=6)
    sk.accelerate(model)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(generated, expected)


def test_accelerate_keeps_parameters_optimizer_and_checkpoints(tmp_path):
    model = peft_model("llama", "prompt")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    assert sk.accelerate(model) is model and sk.is_accelerated(model)
    assert [p for p in model.parameters() if p.requires_grad] == params  # the same objects
    ids, mask = padded_batch()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(reloaded.prompt_encoder["default"].embedding.weight,
                               model.prompt_encoder["default"].embedding.weight)
    sk.restore(model)
    assert not sk.is_accelerated(model)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert "forward" not in model.__dict__


def test_rejects_what_it_cannot_accelerate():
    from peft import LoraConfig

    lora = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    refused = r"active adapter is one of \[.PREFIX_TUNING., .PROMPT_TUNING., .*.ADAPTION_PROMPT.\]; got PeftModelFor"
    with pytest.raises(sk.AccelerationError, match=refused):
        sk.accelerate(lora)
