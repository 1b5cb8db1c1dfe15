"""CARTRIDGE (PEFT's learned per-layer KV prefix with frozen first slots) on the op's prefix directly: parity with
PEFT (loss, text logits, gradients only to the unfrozen slots), greedy generation, save/load, serving from
PromptBank. Initialisation from text under accelerate(): tests/test_hf_inits.py."""
import copy

import pytest
import torch

pytest.importorskip("peft")

from peft import CartridgeConfig, PeftModel, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402
from test_hf_peft_parity import greedy_loop, loss_logits_grads, relative  # noqa: E402

K, FROZEN = 6, 2


def cartridge_model(model_type="llama", seed=0):
    model = get_peft_model(tiny_model(model_type, seed=seed),
                           CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, num_frozen_tokens=FROZEN))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_cartridge_equals_peft_and_trains_only_the_unfrozen_slots(model_type, left):
    model = cartridge_model(model_type)
    ids, mask = padded_batch(left=left)
    loss, logits, grads = loss_logits_grads(model, ids, mask)
    sk.accelerate(model)
    loss2, logits2, grads2 = loss_logits_grads(model, ids, mask)
    real = mask.bool()
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2[real], logits[real]) <= 1e-4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(grads2) == 1 and trainable[0].endswith("trainable_embedding")
    assert not model.prompt_encoder["default"].frozen_embedding.requires_grad
    assert relative(grads2[0], grads[0]) <= 1e-4


def test_generate_and_save_load_and_serving(tmp_path):
    model = cartridge_model("llama")
    ids, mask = padded_batch(B=3, left=True)
    expected = greedy_loop(model, ids, mask, 5)
    sk.accelerate(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, -5:], expected)
    model.save_pretrained(str(tmp_path))
    loaded = sk.accelerate(PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)))
    out2 = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out2, out)
    bank = sk.PromptBank(copy.deepcopy(tiny_model("llama")))
    bank.add("cartridge", str(tmp_path))
    for row in range(3):
        alone = ids[row][mask[row].bool()][None]
        assert bank.generate(alone, adapters=["cartridge"], max_new_tokens=5)[0] == expected[row].tolist()
