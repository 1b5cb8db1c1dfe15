"""Rows of one batch using different prompt adapters (multi-task training, prompt ensembling)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402

LENGTHS = {"a": 5, "b": 3}


def two_adapter_model(kind, model_type):
    make = {"prefix": lambda k: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k),
            "prompt": lambda k: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k)}[kind]
    model = get_peft_model(tiny_model(model_type), make(LENGTHS["a"]), adapter_name="a")
    model.add_adapter("b", make(LENGTHS["b"]))
    with torch.no_grad():
        for i, p in enumerate(model.prompt_encoder.parameters()):
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(True)
    return model


def ce_sum(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def reference(model, kind, ids, mask, names):
    """Each group of rows through PEFT with its own adapter (None: adapters disabled); one summed loss."""
    total, count, logits = 0.0, 0, torch.zeros(*ids.shape, model.config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    for name in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        if name is None:
            with model.disable_adapter():
                out = model.get_base_model()(input_ids=ids[rows], attention_mask=mask[rows])
            group_logits = out.logits
            pred, target = group_logits[:, :-1], labels[rows][:, 1:]
        else:
            model.set_adapter(name)
            out = model(input_ids=ids[rows], attention_mask=mask[rows])
            n = ids.shape[1]
            group_logits = out.logits[:, -n:]
            if kind == "prompt":  # the last prompt position predicts the first token
                pred, target = out.logits[:, -n - 1:-1], labels[rows]
            else:
                pred, target = group_logits[:, :-1], labels[rows][:, 1:]
        logits[rows] = group_logits.detach()
        total = total + ce_sum(pred, target)
        count += int((target != -100).sum())
    model.set_adapter("a")
    return logits, total / count


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_mixed_adapter_batch_equals_each_adapter_alone(kind, model_type):
    model = two_adapter_model(kind, model_type)
    ids, mask = padded_batch(B=5, n=9, seed=2)
    names = ["a", "b", None, "a", "b"]
    params = list(model.prompt_encoder.parameters())
    ref_logits, ref_loss = reference(model, kind, ids, mask, names)
    ref_grads = torch.autograd.grad(ref_loss, params)
    sk.accelerate(model)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), adapter_names=names)
    grads = torch.autograd.grad(out.loss, params)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref_logits[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_adapter_losses_are_each_adapters_own_loss(kind, model_type):
    """``adapter_losses`` [A] (adapters in order of first use; bare rows in none): adapter a's loss is PEFT's
    loss on a's rows alone, and the gradient of their sum gives each adapter the gradient of its own loss."""
    model = two_adapter_model(kind, model_type)
    ids, mask = padded_batch(B=5, n=9, seed=3)
    names = ["b", "a", None, "a", "b"]
    params = list(model.prompt_encoder.parameters())
    own = {}
    for name in ("b", "a"):
        rows = [i for i, n in enumerate(names) if n == name]
        _, own[name] = reference(model, kind, ids[rows], mask[rows], [name] * len(rows))
    ref_grads = torch.autograd.grad(own["a"] + own["b"], params)
    _, whole = reference(model, kind, ids, mask, names)
    sk.accelerate(model)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), adapter_names=names)
    torch.testing.assert_close(out.adapter_losses, torch.stack([own["b"], own["a"]]).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, whole, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(out.adapter_losses.sum(), params), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert out.to_tuple()[0] is out.loss


def test_prompt_ensembling_one_example_many_prompts():
    model = sk.accelerate(two_adapter_model("prompt", "llama"))
    ids, mask = padded_batch(B=1, n=7, seed=4)
    batch = model(input_ids=ids.repeat(2, 1), attention_mask=mask.repeat(2, 1), adapter_names=["a", "b"]).logits
    for row, name in enumerate(["a", "b"]):
        model.set_adapter(name)
        alone = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(batch[row], alone[0], rtol=1e-4, atol=1e-5)


def test_adapter_names_are_checked():
    model = sk.accelerate(two_adapter_model("prompt", "llama"))
    ids, mask = padded_batch(B=2)
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\]"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="adapter_names has 1 entries for a batch of 2 rows"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a"])
