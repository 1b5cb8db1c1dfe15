"""The accelerated PEFT model in the real training stack."""
import os

import pytest
import torch

pytest.importorskip("peft")

from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402
from softprompt_kernels.hf import load_trainable, save_trainable  # noqa: E402

K = 5
CONFIGS = {
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, encoder_hidden_size=32),
}


def make(method, seed=0, model_type="llama"):
    model = get_peft_model(tiny_model(model_type, seed=seed), CONFIGS[method]())
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + p.numel()))
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def loss_and_grads(model, ids, mask):
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    return loss.detach(), torch.autograd.grad(loss, trainable(model))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_gradient_checkpointing(method):
    model = sk.accelerate(make(method)).train()
    ids, mask = padded_batch()
    loss, grads = loss_and_grads(model, ids, mask)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss2, grads2 = loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss2, loss)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bf16_autocast(method):
    model = sk.accelerate(make(method)).train()
    ids, mask = padded_batch()
    loss, grads = loss_and_grads(model, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = loss_and_grads(model, ids, mask)
    assert abs(loss16 - loss).item() <= 2e-2 * loss.item()
    for a, b in zip(grads16, grads):
        assert torch.isfinite(a).all()
        assert (a - b).norm() <= 0.1 * b.norm()


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CONFIGS))
def test_torch_compile(method):
    torch._dynamo.reset()
    model = sk.accelerate(make(method)).train()
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    loss, grads = loss_and_grads(model, ids, mask)
    step = torch.compile(lambda i, m, y: model(input_ids=i, attention_mask=m, labels=y).loss)
    compiled_loss = step(ids, mask, labels)
    compiled_grads = torch.autograd.grad(compiled_loss, trainable(model))
    torch.testing.assert_close(compiled_loss.detach(), loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _dataset(n=16, length=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 97, (length,), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return rows


def test_hf_trainer_trains_the_accelerated_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = sk.accelerate(make("prompt"))
    frozen = model.get_base_model().lm_head.weight.detach().clone()
    prompt = model.prompt_encoder["default"].embedding.weight
    before = prompt.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(prompt.detach(), before)
    assert torch.equal(model.get_base_model().lm_head.weight, frozen)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_loss_curve_matches_peft_step_by_step(method):
    """30 Adam steps from the same start: the accelerated model follows PEFT's loss curve."""
    ids, mask = padded_batch(B=4, n=12, seed=7)
    curves = []
    for accelerated in (False, True):
        model = make(method, seed=11)
        if accelerated:
            sk.accelerate(model)
        model.train()
        optimizer = torch.optim.Adam(trainable(model), lr=1e-2)
        curve = []
        for _ in range(30):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    peft_curve, ours = curves
    assert peft_curve[-1] < peft_curve[0]
    torch.testing.assert_close(ours, peft_curve, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_resume_training_from_a_saved_adapter(method, tmp_path):
    model = sk.accelerate(make(method))
    ids, mask = padded_batch()
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    optimizer.step()
    save_trainable(model, str(tmp_path))
    resumed = sk.accelerate(load_trainable(tiny_model("llama"), str(tmp_path)))
    assert all(p.requires_grad for p in resumed.prompt_encoder.parameters())
    for a, b in zip(resumed.prompt_encoder.parameters(), model.prompt_encoder.parameters()):
        torch.testing.assert_close(a, b)
    loss, _ = loss_and_grads(model, ids, mask)
    resumed_loss, resumed_grads = loss_and_grads(resumed, ids, mask)
    torch.testing.assert_close(resumed_loss, loss)
    assert all(torch.isfinite(g).all() for g in resumed_grads)


def test_resume_from_plain_peft_directory(tmp_path):
    model = make("prompt")
    model.save_pretrained(str(tmp_path))  # PEFT's own files only
    resumed = load_trainable(tiny_model("llama"), str(tmp_path))
    torch.testing.assert_close(resumed.prompt_encoder["default"].embedding.weight,
                               model.prompt_encoder["default"].embedding.weight)
    p_tuning = make("p-tuning")
    p_tuning.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(ValueError, match="only the output of a P_TUNING encoder"):
        load_trainable(tiny_model("llama"), str(tmp_path / "p"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_trainable(tiny_model("llama"), str(tmp_path / "missing"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_ddp_two_processes_equal_one_process(method, tmp_path):
    """Two CPU processes (gloo, DistributedDataParallel), half the batch each, through torchrun."""
    from helpers import run_torchrun

    result_file = str(tmp_path / "grads.pt")
    run_torchrun(os.path.join(os.path.dirname(__file__), "ddp_worker.py"), [method, result_file], timeout=240)
    ddp_grads = torch.load(result_file)
    model = sk.accelerate(make(method))
    ids, _ = padded_batch(B=4, n=8, seed=3)
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    grads = torch.autograd.grad(loss, trainable(model))
    for a, b in zip(ddp_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
