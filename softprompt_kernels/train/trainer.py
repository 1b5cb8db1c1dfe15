"""The training loop of ``softprompt-kernels train``: one or many candidate prompts, trained together.

Every candidate is a PEFT adapter of one PeftModel over the frozen model, accelerated
(``softprompt_kernels.hf.accelerate``). A step takes one batch of the data and runs it under every
candidate:

- causal decoders, several candidates: the batch is repeated once per candidate and goes through one
  forward call with ``adapter_names`` (the op's ``prompt_ids``: one shared-prompt pass per candidate,
  one frozen forward over the repeated rows); the output's ``adapter_losses`` hold each candidate's
  own loss, and their sum is the objective, so each candidate's gradient is that of its own loss;
- one candidate, or an encoder: the plain accelerated forward, once per candidate.

Each candidate has its own optimiser, schedule and gradient clipping, and its adapter is created
right after ``manual_seed(its seed)``; the data order depends only on ``data_seed``. A sweep
therefore reproduces the separate runs with the same seeds and data (a test checks it). The frozen
model runs in eval mode (no dropout), which is what makes that, and resuming, deterministic.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import data as datalib
from .candidates import Candidate, add_adapters, check_candidate, grid, parse_sweeps, peft_config, trainable_parameters

CHECKPOINT = "checkpoint.pt"
# Settings a resumed run must share with the run it continues (steps/epochs may grow).
FIXED_ON_RESUME = ("model", "data", "method", "num_virtual_tokens", "init", "seed", "lr", "batch", "sweep",
                   "data_seed", "max_length", "eval_data", "eval_fraction", "bf16", "encoder_hidden_size",
                   "prefix_projection", "weight_decay", "max_grad_norm", "schedule", "warmup_steps")


class TrainError(ValueError):
    """A run that cannot start, with the reason (the CLI prints it in one line)."""


@dataclass
class TrainSettings:
    model: str
    data: str
    out: str
    method: str = "prompt"
    num_virtual_tokens: int = 20
    init: str = "random"
    seed: int = 0
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch: int = 8
    lr: float = 3e-2
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1
    eval_every: Optional[int] = None
    eval_batch: Optional[int] = None
    bf16: bool = False
    resume: bool = False
    sweep: List[str] = field(default_factory=list)
    save_all: bool = False
    max_length: Optional[int] = None  # None: the model's positions minus the prompt, at most 1024
    data_seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    save_every: Optional[int] = None
    device: str = "cpu"
    progress: bool = True
    plot: bool = True


@dataclass
class CandidateState:
    candidate: Candidate
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loss: List[List[float]] = field(default_factory=list)   # [step, loss]
    eval_loss: List[List[float]] = field(default_factory=list)    # [step, loss]
    eval_accuracy: List[List[float]] = field(default_factory=list)


# --- set-up


def _load_tokenizer(model_dir: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise TrainError(f"--model {model_dir}: no tokenizer could be loaded from it ({error})") from None


def _load_model(settings: TrainSettings, kind: str, labels):
    import transformers

    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    try:
        config = transformers.AutoConfig.from_pretrained(settings.model)
    except (OSError, ValueError) as error:
        raise TrainError(f"--model {settings.model}: not a Hugging Face model directory ({error})") from None
    # A new classification head is initialised here: under a fixed seed, so that every candidate and
    # every separate run starts from the same head.
    torch.manual_seed(0)
    if kind == "classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            settings.model, dtype=dtype, num_labels=len(labels),
            id2label={i: str(label) for i, label in enumerate(labels)},
            label2id={str(label): i for i, label in enumerate(labels)})
    else:
        from ..hf import compat

        if compat.is_masked_lm_family(config.model_type):
            raise TrainError(f"--data {settings.data}: {kind!r} data needs a causal decoder, and {settings.model} is "
                             f"a {config.model_type} encoder (encoders train on {{\"text\", \"label\"}} lines)")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
        except ValueError as error:
            raise TrainError(f"--model {settings.model}: has no causal-LM head for {kind!r} data ({error})") from None
    return model.to(settings.device)


def _lr_lambda(settings: TrainSettings, total_steps: int):
    def factor(step: int) -> float:
        if settings.warmup_steps and step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        if settings.schedule == "linear":
            remaining = total_steps - settings.warmup_steps
            return max(0.0, (total_steps - step) / max(1, remaining))
        return 1.0
    return factor


def _check_settings(settings: TrainSettings) -> None:
    if (settings.steps is None) == (settings.epochs is None):
        raise TrainError("give one of --steps or --epochs")
    if settings.steps is not None and settings.steps < 1:
        raise TrainError(f"--steps must be >= 1, got {settings.steps}")
    if settings.epochs is not None and not settings.epochs > 0:
        raise TrainError(f"--epochs must be > 0, got {settings.epochs}")
    for name in ("batch", "max_length"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    for name in ("eval_every", "save_every", "eval_batch"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if settings.schedule not in ("constant", "linear"):
        raise TrainError(f"--schedule must be constant or linear, got {settings.schedule!r}")
    if settings.max_grad_norm < 0 or settings.weight_decay < 0 or settings.warmup_steps < 0:
        raise TrainError("--max-grad-norm, --weight-decay and --warmup-steps must be >= 0")


@dataclass
class Run:
    """Everything a run holds once it is set up (the CLI's train and the benchmark share it)."""

    settings: TrainSettings
    kind: str
    labels: Optional[list]
    tokenizer: object
    peft_model: object
    causal: bool
    states: List[CandidateState]
    train_examples: List[datalib.Example]
    eval_examples: Optional[List[datalib.Example]]
    eval_source: Optional[str]
    pad_token_id: int
    total_steps: int
    steps_per_epoch: int
    truncated: int
    step: int = 0


def set_up(settings: TrainSettings) -> Run:
    from .. import hf

    _check_settings(settings)
    base = Candidate(settings.method, settings.num_virtual_tokens, settings.init, settings.seed, settings.lr)
    try:
        check_candidate(base)
        candidates = grid(base, parse_sweeps(settings.sweep))
    except ValueError as error:
        raise TrainError(str(error)) from None
    try:
        train_set = datalib.read_jsonl(settings.data)
        if settings.eval_data is not None:
            eval_set = datalib.read_jsonl(settings.eval_data, expected_kind=train_set.kind)
        else:
            train_set, eval_set = datalib.split_off_eval(train_set, settings.eval_fraction, settings.data_seed)
        labels = datalib.label_names(train_set) if train_set.kind == "classification" else None
    except (datalib.DataError, ValueError) as error:
        raise TrainError(str(error)) from None
    tokenizer = _load_tokenizer(settings.model)
    model = _load_model(settings, train_set.kind, labels)
    model.requires_grad_(False)
    try:
        causal = hf.family_of(model.config, model).causal
    except hf.UnsupportedModelError as error:
        raise TrainError(f"--model {settings.model}: {error}") from None
    if train_set.kind == "classification" and causal:
        raise TrainError(f"--data {settings.data}: classification trains on encoders; {settings.model} is a causal "
                         f"decoder ({model.config.model_type}): give it {{\"text\"}} or {{\"prompt\", \"completion\"}} lines")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad
    text_config = hf.compat.text_config(model)
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    longest_prompt = max(c.num_virtual_tokens for c in candidates)
    if settings.max_length is None:
        settings.max_length = min(1024, positions - longest_prompt) if positions is not None else 1024
    if positions is not None and settings.max_length + longest_prompt > positions:
        raise TrainError(f"--max-length {settings.max_length} plus {longest_prompt} virtual tokens passes the "
                         f"model's {positions} positions; lower --max-length")
    task = "SEQ_CLS" if train_set.kind == "classification" else "CAUSAL_LM"
    configs = [peft_config(c, task, settings.model, settings.encoder_hidden_size, settings.prefix_projection)
               for c in candidates]
    peft_model = add_adapters(model, candidates, configs)
    peft_model.set_adapter(candidates[0].name)  # every candidate's parameters train: see _activate
    try:
        hf.accelerate(peft_model)
    except hf.AccelerationError as error:
        raise TrainError(f"--model {settings.model}: {error}") from None
    peft_model.eval()  # no dropout: deterministic candidates and resumes (the module docstring)
    try:
        train_tok = datalib.tokenize(train_set, tokenizer, settings.max_length, labels)
        eval_tok = datalib.tokenize(eval_set, tokenizer, settings.max_length, labels) if eval_set else None
    except datalib.DataError as error:
        raise TrainError(str(error)) from None
    steps_per_epoch = math.ceil(len(train_tok.examples) / settings.batch)
    total = settings.steps if settings.steps is not None else max(1, math.ceil(settings.epochs * steps_per_epoch))
    states = []
    for candidate in candidates:
        params = trainable_parameters(peft_model, candidate.name)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=candidate.lr, weight_decay=settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings, total))
        states.append(CandidateState(candidate, params, optimizer, scheduler))
    return Run(settings, train_set.kind, labels, tokenizer, peft_model, causal, states, train_tok.examples,
               eval_tok.examples if eval_tok else None, eval_set.path if eval_set else None, pad, total,
               steps_per_epoch, train_tok.truncated + (eval_tok.truncated if eval_tok else 0))


# --- steps


def batch_for_step(run: Run, step: int) -> Dict[str, torch.Tensor]:
    return datalib.batch_at(run.train_examples, run.settings.batch, step, run.settings.data_seed, run.pad_token_id)


def predicted_tokens(labels: torch.Tensor, method: str) -> int:
    """Positions PEFT's loss averages over: prompt methods predict labels[:, 0] from the last virtual
    token; prefix tuning (labels passed to the model unchanged) predicts from position 1 on."""
    if labels.dim() == 1:
        return labels.shape[0]
    return int((labels[:, 1:] if method == "prefix" else labels).ne(-100).sum())


def candidate_losses(run: Run, batch: Dict[str, torch.Tensor], states: Sequence[CandidateState]):
    """Each candidate's loss on ``batch`` [len(states)] (differentiable), and its logits when one forward."""
    model = run.peft_model
    batch = {k: v.to(run.settings.device) for k, v in batch.items()}
    if run.causal and len(states) > 1:
        copies = len(states)
        rows = batch["input_ids"].shape[0]
        repeated = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        names = [s.candidate.name for s in states for _ in range(rows)]
        out = model(**repeated, adapter_names=names)
        return out.adapter_losses, [None] * copies
    losses, outputs = [], []
    for state in states:
        _activate(run, state.candidate.name)
        out = model(**batch)
        losses.append(out.loss)
        outputs.append(out.logits if run.kind == "classification" else None)
    return torch.stack(losses), outputs


def _activate(run: Run, name: str) -> None:
    """PEFT's set_adapter, without its side effect of freezing the other adapters' heads (modules_to_save):
    every candidate keeps training."""
    run.peft_model.set_adapter(name)
    for state in run.states:
        for p in state.params:
            p.requires_grad_(True)


def train_step(run: Run) -> torch.Tensor:
    """One optimiser step of every candidate; returns their losses [N] (detached)."""
    batch = batch_for_step(run, run.step)
    losses, _ = candidate_losses(run, batch, run.states)
    losses.sum().backward()  # candidate i's parameters see only loss i
    for state in run.states:
        if run.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(state.params, run.settings.max_grad_norm)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return losses.detach().float().cpu()


@torch.no_grad()
def evaluate(run: Run, examples: Optional[Sequence[datalib.Example]] = None) -> List[Dict[str, float]]:
    """Per candidate: the loss over the eval set (token-weighted as PEFT's loss; per example for
    classification) and, for classification, the accuracy."""
    examples = run.eval_examples if examples is None else examples
    size = run.settings.eval_batch or run.settings.batch
    totals = [[0.0, 0, 0] for _ in run.states]  # loss * count, count, correct
    for batch in datalib.eval_batches(examples, size, run.pad_token_id):
        count = predicted_tokens(batch["labels"], run.settings.method)
        losses, logits = candidate_losses(run, batch, run.states)
        for i, loss in enumerate(losses.float().tolist()):
            totals[i][0] += loss * count
            totals[i][1] += count
            if logits[i] is not None:
                totals[i][2] += int((logits[i].argmax(-1).cpu() == batch["labels"]).sum())
    results = []
    for weighted, count, correct in totals:
        result = {"loss": weighted / count}
        if run.kind == "classification":
            result["accuracy"] = correct / len(examples)
        results.append(result)
    return results


# --- checkpoints


def _checkpoint_path(settings: TrainSettings) -> Path:
    return Path(settings.out) / CHECKPOINT


def save_checkpoint(run: Run) -> None:
    state = {
        "settings": asdict(run.settings), "step": run.step,
        "candidates": {s.candidate.name: {"params": [p.detach().cpu() for p in s.params],
                                          "optimizer": s.optimizer.state_dict(),
                                          "scheduler": s.scheduler.state_dict(),
                                          "train_loss": s.train_loss, "eval_loss": s.eval_loss,
                                          "eval_accuracy": s.eval_accuracy} for s in run.states},
    }
    path = _checkpoint_path(run.settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a run killed while saving keeps the previous checkpoint


def load_checkpoint(run: Run) -> None:
    path = _checkpoint_path(run.settings)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    mine, theirs = asdict(run.settings), saved["settings"]
    changed = [key for key in FIXED_ON_RESUME if mine.get(key) != theirs.get(key)]
    if changed:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed)
        raise TrainError(f"--resume: {path} was trained with other settings ({detail})")
    if saved["step"] > run.total_steps:
        raise TrainError(f"--resume: the checkpoint is at step {saved['step']}, past the {run.total_steps} asked for")
    for state in run.states:
        entry = saved["candidates"][state.candidate.name]
        with torch.no_grad():
            for p, value in zip(state.params, entry["params"]):
                p.copy_(value)
        state.optimizer.load_state_dict(entry["optimizer"])
        state.scheduler.load_state_dict(entry["scheduler"])
        state.train_loss, state.eval_loss = entry["train_loss"], entry["eval_loss"]
        state.eval_accuracy = entry["eval_accuracy"]
    run.step = saved["step"]


# --- the whole run


def best_state(run: Run) -> CandidateState:
    """The candidate with the lowest final eval loss (the last logged train loss without an eval set)."""
    def score(state: CandidateState) -> float:
        history = state.eval_loss if state.eval_loss else state.train_loss
        return history[-1][1] if history else math.inf
    return min(run.states, key=score)


def save_adapter(run: Run, state: CandidateState, directory: Path) -> None:
    """The candidate as a plain PEFT adapter directory (adapter name 'default')."""
    import shutil
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    # PEFT's get_peft_model appends a task's head names ("classifier", "score" for SEQ_CLS) to modules_to_save
    # twice (PEFT 0.21); add_adapter does not. Each module once in the saved config, whichever way it came.
    config = run.peft_model.peft_config[state.candidate.name]
    if getattr(config, "modules_to_save", None):
        config.modules_to_save = list(dict.fromkeys(config.modules_to_save))
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        run.peft_model.save_pretrained(tmp, selected_adapters=[state.candidate.name])
        saved = Path(tmp) / state.candidate.name  # PEFT puts non-default adapters in a subdirectory
        saved = saved if saved.is_dir() else Path(tmp)
        for item in saved.iterdir():
            if item.is_file():
                shutil.move(str(item), directory / item.name)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(run.settings.model)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    if run.labels is not None:
        (directory / "labels.json").write_text(json.dumps(run.labels))


def summary(run: Run, best: CandidateState, seconds: float, tokens: int) -> Dict[str, object]:
    return {
        "settings": asdict(run.settings), "task": run.kind, "steps": run.step, "truncated_examples": run.truncated,
        "eval_set": run.eval_source, "best": best.candidate.name, "seconds": seconds,
        "train_tokens_per_second": tokens / seconds if seconds > 0 else None,
        "candidates": [{**s.candidate.describe(),
                        "final_train_loss": s.train_loss[-1][1] if s.train_loss else None,
                        "final_eval_loss": s.eval_loss[-1][1] if s.eval_loss else None,
                        "final_eval_accuracy": s.eval_accuracy[-1][1] if s.eval_accuracy else None,
                        "train_loss": s.train_loss, "eval_loss": s.eval_loss, "eval_accuracy": s.eval_accuracy}
                       for s in run.states],
    }


def _log_eval(run: Run) -> None:
    if run.eval_examples is None:
        return
    for state, result in zip(run.states, evaluate(run)):
        state.eval_loss.append([run.step, result["loss"]])
        if "accuracy" in result:
            state.eval_accuracy.append([run.step, result["accuracy"]])


def train(settings: TrainSettings, run: Optional[Run] = None) -> Dict[str, object]:
    """Runs (or resumes) training and writes the outputs into ``settings.out``; returns the summary."""
    from tqdm.auto import tqdm

    out = Path(settings.out)
    checkpoint = _checkpoint_path(settings)
    if checkpoint.exists() and not settings.resume:
        raise TrainError(f"--out {out} holds a run (its {CHECKPOINT}): pass --resume to continue it, or choose "
                         "another --out")
    if settings.resume and not checkpoint.exists():
        raise TrainError(f"--resume: no {CHECKPOINT} in {out} to resume from")
    run = run or set_up(settings)
    if settings.resume:
        load_checkpoint(run)
    eval_every = settings.eval_every or max(1, min(run.steps_per_epoch, math.ceil(run.total_steps / 10)))
    save_every = settings.save_every or eval_every
    tokens, start = 0, time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not settings.progress, unit="step",
               desc=f"train {len(run.states)} candidate{'s' if len(run.states) > 1 else ''}")
    while run.step < run.total_steps:
        batch_tokens = int(batch_for_step(run, run.step)["attention_mask"].sum()) * len(run.states)
        losses = train_step(run)
        for state, loss in zip(run.states, losses.tolist()):
            state.train_loss.append([run.step, loss])
        tokens += batch_tokens
        if run.step % eval_every == 0 or run.step == run.total_steps:
            _log_eval(run)
        if run.step % save_every == 0 or run.step == run.total_steps:
            save_checkpoint(run)
        postfix = {"loss": f"{float(losses.mean()):.4f}",
                   "tok/s": f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}"}  # since the start
        if run.states[0].eval_loss:
            postfix["eval"] = f"{min(s.eval_loss[-1][1] for s in run.states if s.eval_loss):.4f}"
        bar.set_postfix(postfix)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    if run.eval_examples is not None and not run.states[0].eval_loss:
        _log_eval(run)  # resumed at the end: still report the eval
    best = best_state(run)
    save_adapter(run, best, out)
    if settings.save_all and len(run.states) > 1:
        for state in run.states:
            save_adapter(run, state, out / "candidates" / state.candidate.name)
    result = summary(run, best, seconds, tokens)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    if settings.plot:
        from .plots import plot_run

        result["plots"] = [str(p) for p in plot_run(result, out)]
    return result
