"""An accelerated model behaves like the PeftModel it is (cases from PEFT's own test checklist):
disable_adapter(), return_dict=False, torch.save/torch.load, a generation_config set on the PeftModel,
input_ids together with inputs_embeds, and a clear error for an attention_mask of the wrong length."""
import io

import pytest
import torch

pytest.importorskip("peft")

from transformers import GenerationConfig  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402
from test_hf_peft_parity import peft_model  # noqa: E402

METHODS = ["prompt", "prefix", "p-tuning-mlp"]


def _labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapter_gives_the_base_model(method):
    model = peft_model("llama", method, seed=3)
    base = tiny_model("llama", seed=3)  # the same weights
    ids, mask = padded_batch(left=True)
    expected = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected_logits = base(input_ids=ids, attention_mask=mask).logits
    sk.accelerate(model)
    with model.disable_adapter():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(generated, expected)
    torch.testing.assert_close(logits[mask.bool()], expected_logits[mask.bool()], rtol=1e-5, atol=1e-5)
    adapted = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(adapted, expected)  # outside the block the adapter is back


@pytest.mark.parametrize("method", METHODS)
def test_return_dict_false_returns_tuples_as_peft(method):
    model = peft_model("llama", method)
    ids, mask = padded_batch()
    with torch.no_grad():
        peft_loss, peft_logits = model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask),
                                       return_dict=False)[:2]
        sk.accelerate(model)
        out = model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask), return_dict=False)
    assert isinstance(out, tuple)
    loss, logits = out[:2]
    torch.testing.assert_close(loss, peft_loss, rtol=1e-4, atol=1e-6)
    n = ids.shape[1]
    torch.testing.assert_close(logits[mask.bool()], peft_logits[:, -n:][mask.bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_torch_save_and_load_of_an_accelerated_model(method):
    model = sk.accelerate(peft_model("llama", method))
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert sk.is_accelerated(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    assert loaded.forward.args[0] is loaded  # bound to the loaded model, not the original


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_forward_keeps_its_signature_for_trainer(method):
    import inspect

    model = sk.accelerate(peft_model("llama", method))
    parameters = inspect.signature(model.forward).parameters
    assert "input_ids" in parameters and "labels" in parameters and "self" not in parameters
    assert "adapter_names" in parameters  # an argument of its own, documented, not hidden in **kwargs
    assert ("input_type_mask" in parameters) == (method == "prompt")  # CPT's, taken by the prompt methods' forward


def test_generation_config_on_the_peft_model_is_honoured():
    model = sk.accelerate(peft_model("llama", "prompt"))
    model.generation_config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    ids, mask = padded_batch()
    out = model.generate(input_ids=ids, attention_mask=mask)
    assert out.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("method", ["prompt", "p-tuning-mlp"])
def test_input_ids_and_inputs_embeds_together_use_the_embeddings_as_peft(method):
    model = peft_model("llama", method)
    ids, mask = padded_batch()
    embeds = model.get_base_model().get_input_embeddings()(ids) * 1.5
    other_ids = torch.randint(3, 90, ids.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(input_ids=other_ids, inputs_embeds=embeds, attention_mask=mask).logits[:, -ids.shape[1]:]
        sk.accelerate(model)
        logits = model(input_ids=other_ids, inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)


def test_input_ids_and_inputs_embeds_together_fail_for_prefix_tuning_as_in_peft():
    model = peft_model("llama", "prefix")
    ids, mask = padded_batch()
    embeds = model.get_base_model().get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=embeds, attention_mask=mask)
    sk.accelerate(model)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=embeds, attention_mask=mask)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_an_attention_mask_of_the_wrong_length_is_named(method):
    model = sk.accelerate(peft_model("llama", method))
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match=r"attention_mask must cover the 0 cached and 9 new tokens"):
        model(input_ids=ids, attention_mask=mask[:, 2:])
