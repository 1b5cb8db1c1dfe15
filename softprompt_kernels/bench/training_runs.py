"""Whole training runs of ``softprompt-kernels train`` on the toy task (nothing downloaded).

``softprompt-kernels bench --suite train-cpu`` measures two cases, each a whole run timed end to end
(loading the model, training, evaluating, saving), in-process:

- **sweep**: 6 candidates (3 initialisations x 2 prompt lengths) trained together by one ``train --sweep``
  run (``sweep``) vs the same 6 as separate ``train`` runs one after another (``separate``, the sum of
  their times; in-process, so the separate runs do not even pay Python's start-up). The final eval
  losses of the two are compared (``max_eval_loss_diff``): the sweep must give the same numbers.
- **throughput**: one candidate, training tokens per second of ``train`` vs plain PEFT with
  transformers' ``Trainer`` on the same data, batches, steps and learning rate (``peft``).

The providers alternate over ``rounds`` rounds; ms is the median whole-run time.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .harness import Record, Suite, Timing, device_name, git_commit

BENCH = "training_runs"
PROVIDERS = ("sweep", "separate", "train", "peft")
CASE_KEY = ("sweep: 6 candidates in one run vs 6 runs; throughput: one candidate, train vs PEFT + Trainer; "
            "B = batch, steps, hidden x layers = the toy Llama")
INITS = ("random", "vocab", "text:the cat sat on the mat")


@dataclass(frozen=True)
class Case:
    kind: str                      # "sweep" | "throughput"
    steps: int = 30
    B: int = 8
    examples: int = 96
    hidden: int = 128
    layers: int = 4
    lengths: tuple = (8, 16)
    per_example: int = 1           # sentences per example (about 9 tokens each)
    rounds: int = 3

    @property
    def name(self) -> str:
        what = f"{len(INITS) * len(self.lengths)} candidates" if self.kind == "sweep" else "1 candidate"
        return (f"{self.kind}: {what}, B{self.B}, ~{9 * self.per_example} tokens, k{self.lengths[0]}"
                + (f"/{self.lengths[1]}" if self.kind == "sweep" else "")
                + f", {self.steps} steps, toy llama {self.hidden}x{self.layers}")


SUITES = {
    # throughput: examples of ~110 tokens and k 32 (the sweep case is the tiny, overhead-bound run of the goal)
    "train-cpu": Suite("train-cpu", "cpu", [Case("sweep"), Case("throughput", steps=40, B=16, hidden=256,
                                                                 lengths=(32,), per_example=12)], Timing()),
    "train-cpu-quick": Suite("train-cpu-quick", "cpu",
                             [Case("sweep", steps=3, B=2, examples=12, hidden=32, layers=1, lengths=(2, 3), rounds=1),
                              Case("throughput", steps=3, B=2, examples=12, hidden=32, layers=1, rounds=1)],
                             Timing()),
}


def known_providers() -> List[str]:
    return list(PROVIDERS)


def _settings(case: Case, root: Path, out: str, **overrides):
    from ..train.trainer import TrainSettings

    base = dict(model=str(root / "model"), data=str(root / "train.jsonl"), eval_data=str(root / "eval.jsonl"),
                out=str(root / out), method="prompt", num_virtual_tokens=case.lengths[0], steps=case.steps,
                batch=case.B, lr=3e-2, progress=False, plot=False, eval_every=case.steps)
    base.update(overrides)
    return TrainSettings(**base)


def _run_train(settings) -> Dict[str, object]:
    from ..train.trainer import train

    return train(settings)


def _sweep(case: Case, root: Path, tag: str):
    result = _run_train(_settings(case, root, f"sweep-{tag}", sweep=[
        "init=" + "|".join(INITS), "num_virtual_tokens=" + ",".join(map(str, case.lengths))]))
    return {c["name"]: c["final_eval_loss"] for c in result["candidates"]}


def _separate(case: Case, root: Path, tag: str):
    losses = {}
    for init in INITS:
        for k in case.lengths:
            result = _run_train(_settings(case, root, f"sep-{tag}-{init[:4]}-{k}", init=init, num_virtual_tokens=k))
            (candidate,) = result["candidates"]
            losses[candidate["name"]] = candidate["final_eval_loss"]
    return losses


def _peft_trainer(case: Case, root: Path, tag: str) -> int:
    """Plain PEFT prompt tuning through transformers' Trainer: same data order, batches, steps and lr."""
    import peft
    import transformers

    from ..train import data as datalib

    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "model")
    examples = datalib.tokenize(datalib.read_jsonl(str(root / "train.jsonl")), tokenizer, 256 - max(case.lengths)).examples  # train's default max_length
    batches = [datalib.batch_at(examples, case.B, step, 0, tokenizer.pad_token_id) for step in range(case.steps)]
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval()
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                    num_virtual_tokens=case.lengths[0]))

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    args = transformers.TrainingArguments(output_dir=str(root / f"peft-{tag}"), max_steps=case.steps,
                                          per_device_train_batch_size=1, learning_rate=3e-2, lr_scheduler_type="constant",
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0,
                                          weight_decay=0.0, warmup_steps=0)
    trainer = transformers.Trainer(model=peft_model, args=args, train_dataset=Batches(),
                                   data_collator=lambda items: items[0])
    trainer.train()
    return sum(int(b["attention_mask"].sum()) for b in batches)


def _prepare(case: Case, root: Path) -> None:
    from .toy_task import llama_dir, text_data

    llama_dir(root / "model", hidden=case.hidden, layers=case.layers, heads=4, kv_heads=2)
    text_data(root / "train.jsonl", case.examples, seed=0, per_example=case.per_example)
    text_data(root / "eval.jsonl", max(4, case.examples // 6), seed=1, per_example=case.per_example)


def measure(case: Case, device, providers: Optional[Sequence[str]], timing: Timing) -> List[Record]:
    if torch.device(device).type != "cpu":
        raise SystemExit("the training-run benchmark runs on the CPU")
    names = ("separate", "sweep") if case.kind == "sweep" else ("peft", "train")
    names = [n for n in names if providers is None or n in providers]
    times: Dict[str, List[float]] = {n: [] for n in names}
    extra: Dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="sk-train-bench-") as tmp:
        root = Path(tmp)
        _prepare(case, root)
        for round_index in range(case.rounds):
            order = names if round_index % 2 == 0 else list(reversed(names))
            for name in order:
                tag = f"{name}-{round_index}"
                start = time.perf_counter()
                if name == "sweep":
                    extra["sweep_losses"] = _sweep(case, root, tag)
                elif name == "separate":
                    extra["separate_losses"] = _separate(case, root, tag)
                elif name == "train":
                    result = _run_train(_settings(case, root, tag))
                    extra["train_tokens"] = int(result["train_tokens_per_second"] * result["seconds"])
                else:
                    extra["peft_tokens"] = _peft_trainer(case, root, tag)
                times[name].append(time.perf_counter() - start)
    summary: Dict[str, object] = {}
    if "sweep_losses" in extra and "separate_losses" in extra:
        a, b = extra["sweep_losses"], extra["separate_losses"]
        summary["max_eval_loss_diff"] = max(abs(a[k] - b[k]) for k in a)
    records = []
    for name in names:
        seconds = statistics.median(times[name])
        config = {"name": case.name, **asdict(case), **summary, "seconds_per_round": times[name]}
        tokens = extra.get(f"{name}_tokens")
        if tokens:
            config["tokens_per_s"] = tokens / seconds
        records.append(Record(bench=BENCH, provider=name, device=device_name(torch.device(device)),
                              commit=git_commit(), config=config, ms=1e3 * seconds, tflops=0.0, gbps=0.0,
                              peak_mem_mb=None))
    return records


def goals(records: Sequence[Record]) -> List[str]:
    """The sweep goal (<= 0.6x the wall time of separate runs) and train's throughput against PEFT."""
    by: Dict[str, Dict[str, Record]] = {}
    for r in records:
        by.setdefault(r.config["kind"], {})[r.provider] = r
    lines = []
    sweep = by.get("sweep", {})
    if {"sweep", "separate"} <= set(sweep):
        ratio = sweep["sweep"].ms / sweep["separate"].ms
        diff = sweep["sweep"].config.get("max_eval_loss_diff")
        lines.append(f"6-candidate sweep: {ratio:.2f}x the wall time of 6 separate runs "
                     f"(goal <= 0.6x: {'met' if ratio <= 0.6 else 'NOT met'}); final eval losses differ by "
                     f"at most {diff:.2e}")
    through = by.get("throughput", {})
    if {"train", "peft"} <= set(through):
        mine, theirs = through["train"].config.get("tokens_per_s"), through["peft"].config.get("tokens_per_s")
        if mine and theirs:
            lines.append(f"train: {mine:.0f} tokens/s vs PEFT + Trainer {theirs:.0f} tokens/s "
                         f"({mine / theirs:.2f}x; whole runs incl. loading)")
    return lines
