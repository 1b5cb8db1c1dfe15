"""MULTITASK_PROMPT_TUNING on causal decoders: accelerate() against PEFT with several tasks in one batch (loss,
text logits, every trainable gradient), greedy generation, the op actually running, restore, bad task_ids. On the
BERT and RoBERTa encoders (sequence and token classification): each row's task prompt inserted, the same checks
and a save/load round trip."""
import pytest
import torch

pytest.importorskip("peft")

from peft import MultitaskPromptTuningConfig, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import ENCODERS, padded_batch, tiny_model  # noqa: E402
from test_hf_peft_parity import greedy_loop, loss_logits_grads, relative  # noqa: E402

K, TASKS = 5, 3


def multitask_model(model_type="llama", seed=0):
    model = get_peft_model(tiny_model(model_type, seed=seed),
                           MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, num_tasks=TASKS,
                                                       num_ranks=2))
    with torch.no_grad():  # PEFT's task factors start near 0.02: make every task's prompt matter
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.7, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model


class _Forward:
    def __init__(self, model, task_ids):
        self.model, self.task_ids = model, task_ids

    def __call__(self, **kwargs):
        return self.model(task_ids=self.task_ids, **kwargs)

    def parameters(self):
        return self.model.parameters()


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "qwen3"])
def test_several_tasks_in_one_batch_equal_peft(model_type, left):
    model = multitask_model(model_type)
    ids, mask = padded_batch(B=4, left=left)
    task_ids = torch.tensor([2, 0, 2, 1])
    loss, logits, grads = loss_logits_grads(_Forward(model, task_ids), ids, mask)
    sk.accelerate(model)
    loss2, logits2, grads2 = loss_logits_grads(_Forward(model, task_ids), ids, mask)
    sk.restore(model)
    real = mask.bool()
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2[real], logits[real]) <= 1e-4
    assert len(grads2) == 3  # the shared prompt and both task factors
    for g2, g in zip(grads2, grads):
        assert relative(g2, g) <= 1e-4


def test_greedy_generate_equals_a_greedy_loop_over_peft():
    model = multitask_model("llama")
    ids, mask = padded_batch(B=3, left=True)
    task_ids = torch.tensor([1, 2, 0])
    expected = greedy_loop(_Forward(model, task_ids), ids, mask, 6)
    sk.accelerate(model)
    out = model.generate(input_ids=ids, attention_mask=mask, task_ids=task_ids, max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out[:, -6:], expected)


def test_the_op_runs_once_per_layer_for_all_tasks():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "prefix_attention_fwd" in str(func):
                Record.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    model = sk.accelerate(multitask_model("llama"))
    ids, mask = padded_batch(B=4)
    with Record():
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1, 0]))
    layers = model.get_base_model().config.num_hidden_layers
    assert sorted(Record.rows) == [2] * layers + [4] * layers  # one pass for the 2 distinct tasks, then the batch


def test_task_ids_are_checked():
    model = sk.accelerate(multitask_model("llama"))
    ids, mask = padded_batch(B=2)
    with pytest.raises(ValueError, match="task_ids is required"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, num_tasks=3\)"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"task_ids must be an integer tensor \[B=2\]"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="adapter_names does not apply"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]), adapter_names=["default"] * 2)


def test_save_load_round_trip_and_gradient_checkpointing(tmp_path):
    from peft import PeftModel

    model = multitask_model("llama")
    ids, mask = padded_batch(B=3)
    task_ids = torch.tensor([0, 2, 1])
    loss, logits, grads = loss_logits_grads(_Forward(model, task_ids), ids, mask)
    model.save_pretrained(str(tmp_path))
    loaded = sk.accelerate(PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)))
    with torch.no_grad():
        logits2 = loaded(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    real = mask.bool()
    assert relative(logits2[real], logits[real]) <= 1e-4
    sk.accelerate(model).train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss2, _, grads2 = loss_logits_grads(_Forward(model, task_ids), ids, mask)
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    for g2, g in zip(grads2, grads):
        assert relative(g2, g) <= 1e-4


# --- encoders: each row's task prompt inserted into the layer-0 input (one insertion per distinct task)

NUM_LABELS = 3


def encoder_multitask_model(model_type, task="SEQ_CLS", seed=0):
    head = {"SEQ_CLS": "seq_cls", "TOKEN_CLS": "token_cls"}[task]
    model = get_peft_model(tiny_model(model_type, head, seed=seed, num_labels=NUM_LABELS),
                           MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=K, num_tasks=TASKS,
                                                       num_ranks=2))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.7, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model


def _encoder_labels(task, ids, mask):
    gen = torch.Generator().manual_seed(5)
    if task == "SEQ_CLS":
        return torch.randint(0, NUM_LABELS, (ids.shape[0],), generator=gen)
    return torch.randint(0, NUM_LABELS, ids.shape, generator=gen).masked_fill(mask == 0, -100)


def _encoder_loss_logits_grads(model, ids, mask, labels, task_ids, text_only_logits=False):
    """Loss, logits and every trainable gradient; ``text_only_logits``: PEFT's token logits without the prompt's
    rows, and the loss over the text tokens (what the accelerated model returns for TOKEN_CLS)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if text_only_logits:
        logits = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits[:, K:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, NUM_LABELS), labels.reshape(-1), ignore_index=-100)
    else:
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
        loss, logits = out.loss, out.logits
    return loss.detach(), logits.detach(), torch.autograd.grad(loss, params)


def _kernel_calls(fn):
    """Calls of each project op (forward and backward) while ``fn`` runs, by op name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key.split("::")[1]: e.count for e in prof.key_averages() if e.key.startswith("softprompt_kernels::")}


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_sequence_classification_several_tasks_equal_peft(model_type, left):
    model = encoder_multitask_model(model_type)
    ids, mask = padded_batch(B=4, left=left)
    labels, task_ids = _encoder_labels("SEQ_CLS", ids, mask), torch.tensor([2, 0, 2, 1])
    loss, logits, grads = _encoder_loss_logits_grads(model, ids, mask, labels, task_ids)
    sk.accelerate(model)
    calls = _kernel_calls(lambda: _encoder_loss_logits_grads(model, ids, mask, labels, task_ids))
    loss2, logits2, grads2 = _encoder_loss_logits_grads(model, ids, mask, labels, task_ids)
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2, logits) <= 1e-4
    # the shared prompt, both task factors and the classifier PEFT trains (modules_to_save)
    assert len(grads2) == len(grads) >= 5
    for g2, g in zip(grads2, grads):
        assert relative(g2, g) <= 1e-4
    layers = model.get_base_model().config.num_hidden_layers
    assert calls["insert_prompt_fwd"] == calls["insert_prompt_bwd"] == 3  # one insertion per distinct task
    assert calls["prefix_attention_fwd"] == calls["prefix_attention_bwd"] == layers


@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_token_classification_several_tasks_line_up_with_text(model_type):
    model = encoder_multitask_model(model_type, "TOKEN_CLS")
    ids, mask = padded_batch(B=4, left=False)
    labels, task_ids = _encoder_labels("TOKEN_CLS", ids, mask), torch.tensor([1, 1, 0, 2])
    loss, logits, grads = _encoder_loss_logits_grads(model, ids, mask, labels, task_ids, text_only_logits=True)
    sk.accelerate(model)
    loss2, logits2, grads2 = _encoder_loss_logits_grads(model, ids, mask, labels, task_ids)
    assert logits2.shape == (*ids.shape, NUM_LABELS)
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2, logits) <= 1e-4
    assert len(grads2) == len(grads)
    for g2, g in zip(grads2, grads):
        assert relative(g2, g) <= 1e-4
    with torch.no_grad():  # the same rows given as embeddings
        embeds = model.get_base_model().get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, task_ids=task_ids).logits
    assert relative(from_embeds, logits) <= 1e-4


def test_encoder_one_task_for_the_whole_batch_is_one_insertion():
    model = sk.accelerate(encoder_multitask_model("bert"))
    ids, mask = padded_batch(B=3)
    with torch.no_grad():
        calls = _kernel_calls(lambda: model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([1, 1, 1])))
    assert calls["insert_prompt_fwd"] == 1


@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_save_load_round_trip(model_type, tmp_path):
    from peft import PeftModel

    model = encoder_multitask_model(model_type)
    ids, mask = padded_batch(B=4)
    labels, task_ids = _encoder_labels("SEQ_CLS", ids, mask), torch.tensor([0, 2, 1, 2])
    _, logits, _ = _encoder_loss_logits_grads(model, ids, mask, labels, task_ids)
    model.save_pretrained(str(tmp_path))
    base = tiny_model(model_type, "seq_cls", num_labels=NUM_LABELS)
    with torch.no_grad():  # PEFT saves the classifier it trains (modules_to_save): it is loaded back
        for p in base.classifier.parameters():
            p.normal_(0, 1.0)
    loaded = sk.accelerate(PeftModel.from_pretrained(base, str(tmp_path)))
    with torch.no_grad():
        logits2 = loaded(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    assert relative(logits2, logits) <= 1e-4


def test_encoder_task_ids_are_checked():
    model = sk.accelerate(encoder_multitask_model("bert"))
    ids, mask = padded_batch(B=2)
    with pytest.raises(ValueError, match="task_ids is required"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, num_tasks=3\)"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 3]))
