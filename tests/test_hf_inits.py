"""PEFT's initialisation options under accelerate(): the accelerated model keeps the weights PEFT initialised (it
never re-initialises) and gives PEFT's loss, logits and gradients from them.

- PROMPT_TUNING with PromptTuningInit TEXT (the prompt is the embedding of the text's tokens, repeated to k),
  SAMPLE_VOCAB (rows of the embedding matrix) and RANDOM, on a causal decoder and on an encoder;
- MULTITASK_PROMPT_TUNING with its options: RANDOM, TEXT, and the source-task ones from a saved multitask adapter
  (AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK, ONLY_SOURCE_SHARED);
- CARTRIDGE from a text prefill (PEFT's ``initialize_kv_prefix_from_text``) run on the accelerated model: the
  prefix equals the one made on the plain PEFT model, and training from it equals PEFT's.

The prompts are left as PEFT made them (no re-drawing, unlike the parity tests): the initialisation is the point.
"""
import pytest
import torch

pytest.importorskip("peft")

from peft import MultitaskPromptTuningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model  # noqa: E402

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch, tiny_model  # noqa: E402
from test_hf_cartridge import cartridge_model  # noqa: E402
from test_hf_multitask import _Forward  # noqa: E402
from test_hf_peft_parity import loss_logits_grads, relative  # noqa: E402

K = 7
TEXT = "the cat sat on the mat"  # 6 words: repeated to K virtual tokens
NUM_LABELS = 3


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from softprompt_kernels.bench.toy_task import word_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    word_tokenizer().save_pretrained(str(directory))
    return str(directory)


def _init_options(init, tokenizer_dir):
    if init == "TEXT":
        return dict(prompt_tuning_init=init, prompt_tuning_init_text=TEXT, tokenizer_name_or_path=tokenizer_dir)
    return dict(prompt_tuning_init=init)


def _text_prompt(model, tokenizer_dir, k=K):
    """What TEXT initialisation means: the word embeddings of the text's tokens, repeated and cut to k."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(TEXT)["input_ids"]
    ids = (ids * (k // len(ids) + 1))[:k]
    return model.get_base_model().get_input_embeddings().weight[torch.tensor(ids)].detach()


def _prompt_weight(model):
    return model.prompt_encoder["default"].embedding.weight


def _encoder_loss_logits_grads(model, ids, mask, **kwargs):
    labels = torch.tensor([0, 2, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), out.logits.detach(), torch.autograd.grad(out.loss, params)


def _assert_same(ours, peft, real=None):
    (loss2, logits2, grads2), (loss, logits, grads) = ours, peft
    if real is not None:
        logits2, logits = logits2[real], logits[real]
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2, logits) <= 1e-4
    assert len(grads2) == len(grads)
    for g2, g in zip(grads2, grads):
        assert relative(g2, g) <= 1e-4


@pytest.mark.parametrize("init", [PromptTuningInit.TEXT, PromptTuningInit.SAMPLE_VOCAB, PromptTuningInit.RANDOM],
                         ids=lambda i: i.value)
@pytest.mark.parametrize("model_type, task", [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_prompt_tuning_inits_are_kept_and_equal_peft(model_type, task, init, tokenizer_dir):
    torch.manual_seed(3)
    head = "causal_lm" if task == "CAUSAL_LM" else "seq_cls"
    model = get_peft_model(tiny_model(model_type, head, num_labels=NUM_LABELS),
                           PromptTuningConfig(task_type=task, num_virtual_tokens=K,
                                              **_init_options(init, tokenizer_dir)))
    made = _prompt_weight(model).detach().clone()
    words = model.get_base_model().get_input_embeddings().weight.detach()
    if init == PromptTuningInit.TEXT:
        assert torch.equal(made, _text_prompt(model, tokenizer_dir))
    elif init == PromptTuningInit.SAMPLE_VOCAB:  # every virtual token is some word's embedding
        assert all((words == row).all(-1).any() for row in made)
    ids, mask = padded_batch()
    run = loss_logits_grads if task == "CAUSAL_LM" else _encoder_loss_logits_grads
    reference = run(model, ids, mask)
    sk.accelerate(model)
    assert torch.equal(_prompt_weight(model), made)  # accelerate() did not re-initialise
    ours = run(model, ids, mask)
    _assert_same(ours, reference, mask.bool() if task == "CAUSAL_LM" else None)
    assert torch.equal(_prompt_weight(model), made)


# --- multitask prompt tuning: its own options, the source-task ones from a saved multitask adapter

TASKS = 3


def _multitask(num_tasks=TASKS, **options):
    torch.manual_seed(4)
    return get_peft_model(tiny_model("llama"), MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=K, num_tasks=num_tasks, num_ranks=2, **options))


@pytest.fixture(scope="module")
def source_adapter(tmp_path_factory):
    """A 'trained' multitask adapter of TASKS tasks (its factors drawn away from PEFT's near-zero start), saved;
    returns (its safetensors file, its state)."""
    model = _multitask()
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.7, generator=torch.Generator().manual_seed(p.numel()))
    directory = tmp_path_factory.mktemp("source")
    model.save_pretrained(str(directory))
    return str(directory / "adapter_model.safetensors"), _multitask_state(model)


def _multitask_state(model):
    encoder = model.prompt_encoder["default"]
    return {"prompt_embeddings": encoder.embedding.weight.detach().clone(),
            "prefix_task_cols": encoder.prefix_task_cols.detach().clone(),
            "prefix_task_rows": encoder.prefix_task_rows.detach().clone()}


@pytest.mark.parametrize("init", ["RANDOM", "TEXT", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_multitask_inits_are_kept_and_equal_peft(init, source_adapter, tokenizer_dir):
    path, source = source_adapter
    options, num_tasks = {"prompt_tuning_init": init}, TASKS
    if init == "TEXT":
        options.update(prompt_tuning_init_text=TEXT, tokenizer_name_or_path=tokenizer_dir)
    elif init != "RANDOM":
        options["prompt_tuning_init_state_dict_path"] = path
    if init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK"):  # they make the factors of one task
        num_tasks = 1
    if init == "EXACT_SOURCE_TASK":
        options["prompt_tuning_init_task"] = 2
    model = _multitask(num_tasks, **options)
    made = _multitask_state(model)
    if init == "TEXT":
        assert torch.equal(made["prompt_embeddings"], _text_prompt(model, tokenizer_dir))
    if init not in ("RANDOM", "TEXT"):
        assert torch.equal(made["prompt_embeddings"], source["prompt_embeddings"])
    if init == "AVERAGE_SOURCE_TASKS":
        torch.testing.assert_close(made["prefix_task_cols"], source["prefix_task_cols"].mean(0, keepdim=True))
        torch.testing.assert_close(made["prefix_task_rows"], source["prefix_task_rows"].mean(0, keepdim=True))
    if init == "EXACT_SOURCE_TASK":
        assert torch.equal(made["prefix_task_cols"], source["prefix_task_cols"][2:3])
        assert torch.equal(made["prefix_task_rows"], source["prefix_task_rows"][2:3])
    ids, mask = padded_batch(B=4)
    task_ids = torch.tensor([2, 0, 2, 1]) % num_tasks
    reference = loss_logits_grads(_Forward(model, task_ids), ids, mask)
    sk.accelerate(model)
    assert all(torch.equal(value, made[name]) for name, value in _multitask_state(model).items())
    _assert_same(loss_logits_grads(_Forward(model, task_ids), ids, mask), reference, mask.bool())


# --- Cartridges: PEFT's initialisation from a text prefill, run on the accelerated model


def test_cartridge_initialisation_from_text_on_the_accelerated_model_equals_peft():
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text

    from softprompt_kernels.bench.toy_task import word_tokenizer

    tokenizer = word_tokenizer()
    text = "the cat sat on the mat the dog ran"
    reference = cartridge_model("llama")  # its prefix drawn at random: the initialisation overwrites it
    expected = initialize_kv_prefix_from_text(reference, tokenizer, text=text, use_chat_template=False)
    model = sk.accelerate(cartridge_model("llama"))
    got = initialize_kv_prefix_from_text(model, tokenizer, text=text, use_chat_template=False)
    assert sk.hf.is_accelerated(model)  # the prefill ran inside PEFT's disable_adapter() on the accelerated model
    assert relative(got, expected) <= 1e-5
    torch.testing.assert_close(model.prompt_encoder["default"].weight, reference.prompt_encoder["default"].weight,
                               rtol=1e-5, atol=1e-6)
    ids, mask = padded_batch()
    _assert_same(loss_logits_grads(model, ids, mask), loss_logits_grads(reference, ids, mask), mask.bool())
