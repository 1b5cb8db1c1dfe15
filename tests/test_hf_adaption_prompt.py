"""ADAPTION_PROMPT (LLaMA-Adapter) on causal decoders: each adapted layer's gated adapter term is one prefix-only
``prefix_attention`` call over the adapter tokens' K/V at batch 1. Against PEFT on the families PEFT supports
(llama, mistral, gpt2) with a non-zero gate (a zero gate hides the adapter): loss, logits, every trainable
gradient, both paddings; greedy generation; gradient checkpointing; several adapters with set_adapter; save/load;
the op actually running; restore; qwen3 (which PEFT has no recipe for) refused with the reason."""
import pytest
import torch

pytest.importorskip("peft")

from peft import AdaptionPromptConfig, PeftModel, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from softprompt_kernels.profiling import kernel_calls  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402
from test_hf_peft_parity import greedy_loop, relative  # noqa: E402

FAMILIES = ["llama", "mistral", "gpt2"]
ADAPTER_LEN = 5


def adaption_model(model_type="llama", seed=0, gate=0.7, adapter_layers=2):
    model = get_peft_model(tiny_model(model_type, seed=seed),
                           AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=ADAPTER_LEN,
                                                adapter_layers=adapter_layers))
    set_gates(model, gate, seed)
    return model


def set_gates(model, gate, seed=0, spread=0.1):
    """Non-zero gates, different per layer (PEFT's start at 0: the adapter would be invisible and every test pass)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if name.endswith("adaption_gate"):
                p.fill_(gate + spread * (i + seed))


def trainable(model):
    return [p for _, p in sorted(model.named_parameters()) if p.requires_grad]


def loss_logits_grads(model, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.loss.detach(), out.logits.detach(), torch.autograd.grad(out.loss, trainable(model))


def assert_same(got, expected, mask):
    (loss2, logits2, grads2), (loss, logits, grads) = got, expected
    real = mask.bool()
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2[real], logits[real]) <= 1e-4
    assert len(grads2) == len(grads) > 0
    for g2, g in zip(grads2, grads):
        assert g.abs().sum() > 0
        assert relative(g2, g) <= 1e-4


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_adaption_prompt_equals_peft(model_type, left):
    model = adaption_model(model_type)
    ids, mask = padded_batch(left=left)
    expected = loss_logits_grads(model, ids, mask)
    params = trainable(model)
    sk.accelerate(model)
    assert trainable(model) == params and all(a is b for a, b in zip(trainable(model), params))  # same objects
    assert_same(loss_logits_grads(model, ids, mask), expected, mask)


def test_the_gate_matters():
    """The parity above is not vacuous: the adapter term changes the logits."""
    ids, mask = padded_batch()
    with torch.no_grad():
        gated = adaption_model()(input_ids=ids, attention_mask=mask).logits
        closed = adaption_model()
        set_gates(closed, 0.0, spread=0.0)  # PEFT's zero init: the base model's logits
        closed = closed(input_ids=ids, attention_mask=mask).logits
    assert relative(gated, closed) > 1e-2


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_equals_a_greedy_loop_over_peft(model_type):
    model = adaption_model(model_type, seed=1)
    ids, mask = padded_batch(left=True)
    expected = greedy_loop(model, ids, mask, 6)
    sk.accelerate(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, ids.shape[1]:], expected)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_gradient_checkpointing(model_type):
    model = adaption_model(model_type)
    ids, mask = padded_batch()
    expected = loss_logits_grads(model, ids, mask)
    sk.accelerate(model).train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert_same(loss_logits_grads(model, ids, mask), expected, mask)


def test_several_adapters_with_set_adapter():
    model = adaption_model("llama")
    model.add_adapter("second", AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1))
    ids, mask = padded_batch()
    model.set_adapter("second")
    set_gates(model, 0.4)
    second = loss_logits_grads(model, ids, mask)
    model.set_adapter("default")
    default = loss_logits_grads(model, ids, mask)
    sk.accelerate(model)
    assert_same(loss_logits_grads(model, ids, mask), default, mask)
    model.set_adapter("second")  # PEFT swaps its cached modules in: they were accelerated too
    calls = _kernel_calls(lambda: loss_logits_grads(model, ids, mask))
    assert calls.get("prefix_attention_fwd") == 1  # one adapted layer
    assert_same(loss_logits_grads(model, ids, mask), second, mask)


def test_save_load_round_trip(tmp_path):
    model = sk.accelerate(adaption_model("mistral"))
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(str(tmp_path))  # PEFT's own format, untouched by accelerate
    loaded = PeftModel.from_pretrained(tiny_model("mistral"), str(tmp_path))
    with torch.no_grad():
        peft_logits = loaded(input_ids=ids, attention_mask=mask).logits
        accelerated_logits = sk.accelerate(loaded)(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert relative(peft_logits[real], logits[real]) <= 1e-4
    assert relative(accelerated_logits[real], logits[real]) <= 1e-4


def _kernel_calls(fn):
    """Calls of each project op (forward and backward) while ``fn`` runs, by short op name."""
    return {name.split("::")[1]: count for name, count in kernel_calls(fn)[1].items()}


def test_the_op_runs_once_per_adapted_layer_and_restore_undoes_it():
    model = adaption_model("llama", adapter_layers=2)
    ids, mask = padded_batch()
    expected = loss_logits_grads(model, ids, mask)
    assert _kernel_calls(lambda: loss_logits_grads(model, ids, mask)) == {}
    sk.accelerate(model)
    assert sk.hf.is_accelerated(model)
    calls = _kernel_calls(lambda: loss_logits_grads(model, ids, mask))
    assert calls.get("prefix_attention_fwd") == 2 and calls.get("prefix_attention_bwd") == 2, calls
    sk.restore(model)
    assert not sk.hf.is_accelerated(model) and "generate" not in model.__dict__
    assert _kernel_calls(lambda: loss_logits_grads(model, ids, mask)) == {}
    assert_same(loss_logits_grads(model, ids, mask), expected, mask)


def test_qwen3_is_refused_with_the_reason():
    """PEFT's adaption prompt knows how to recompute the query only for llama, mistral and gpt2: it refuses qwen3
    itself, and accelerate() refuses a model type outside that list by name."""
    with pytest.raises(ValueError, match="Unsupported model type for adaption prompt: 'qwen3'"):
        get_peft_model(tiny_model("qwen3"), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3,
                                                                 adapter_layers=1))
    model = adaption_model("llama")
    model.get_base_model().config.model_type = "qwen3"
    with pytest.raises(sk.hf.AccelerationError,
                       match=r"ADAPTION_PROMPT on qwen3 is not supported: PEFT's adaption prompt has a query "
                             r"recomputation only for \['llama', 'mistral', 'gpt2'\]"):
        sk.accelerate(model)
    assert not sk.hf.is_accelerated(model)
