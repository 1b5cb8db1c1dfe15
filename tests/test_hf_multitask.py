"""MULTITASK_PROMPT_TUNING on causal decoders: accelerate() against PEFT with several tasks in one batch (loss,
text logits, every trainable gradient), greedy generation, the op actually running, restore, bad task_ids."""
import pytest
import torch

pytest.importorskip("peft")

from peft import MultitaskPromptTuningConfig, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402
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


def test_encoders_are_refused_by_name():
    model = get_peft_model(tiny_model("bert", head="seq_cls"),
                           MultitaskPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=K, num_tasks=2))
    with pytest.raises(sk.hf.AccelerationError, match="MULTITASK_PROMPT_TUNING is accelerated on causal decoders"):
        sk.accelerate(model)


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
