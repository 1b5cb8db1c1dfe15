"""``softprompt-kernels train``: arguments and the table printed at the end."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ..cli_format import HelpFormatter
from .candidates import INITS, METHODS, SWEEPABLE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    parser.add_argument("--model", required=True,
                        help="a Hugging Face model directory with its tokenizer (to try the command: "
                             "softprompt-kernels toy-model DIR writes a toy one)")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl",
                        help='training data: {"text"} lines (causal LM), {"prompt", "completion"} (loss on the '
                             'completion) or {"text", "label"} (sequence classification, encoders)')
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: the PEFT adapter of the best candidate, metrics.json, loss.png, "
                             "the checkpoint that --resume continues")
    parser.add_argument("--method", default="prompt", choices=sorted(METHODS),
                        help="prompt tuning, P-tuning or prefix tuning (P-Tuning v2)")
    parser.add_argument("--num-virtual-tokens", type=int, default=20, dest="num_virtual_tokens",
                        help="prompt length k")
    parser.add_argument("--init", default="random",
                        help="initialisation: " + "; ".join(f"{m}: {'|'.join(i)}" for m, i in INITS.items())
                             + " (vocab: PEFT's SAMPLE_VOCAB; text:WORDS: PEFT's TEXT init from WORDS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter's initial weights")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimiser steps")
    length.add_argument("--epochs", type=float, help="passes over the training data (fractions allowed)")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (each candidate sees all of them)")
    parser.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate")
    parser.add_argument("--eval-data", dest="eval_data", metavar="FILE.jsonl",
                        help="evaluation data (same kind of lines); without it --eval-fraction is held out")
    parser.add_argument("--eval-fraction", type=float, default=0.1, dest="eval_fraction",
                        help="share of --data held out for evaluation when no --eval-data is given (0: none)")
    parser.add_argument("--eval-every", type=int, dest="eval_every",
                        help="steps between evaluations (default: an epoch or a tenth of the run, the shorter)")
    parser.add_argument("--eval-batch", type=int, dest="eval_batch", help="evaluation batch (default: --batch)")
    parser.add_argument("--bf16", action="store_true", help="load the frozen model in bfloat16")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint (--steps/--epochs may be raised)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help=f"train every combination together (repeatable); keys: {', '.join(SWEEPABLE)}; values "
                             "separated by ',' or '|' (seed=0,1,2 or init='random|vocab'); text inits, which may "
                             "hold commas, by '|' only (init='random|text:great movie, good film')")
    parser.add_argument("--save-all", action="store_true", dest="save_all",
                        help="also save every candidate's adapter under OUT/candidates/NAME")
    parser.add_argument("--max-length", type=int, dest="max_length",
                        help="tokens per example; longer ones are cut (and counted in the summary); default: the "
                             "model's positions minus the prompt length, at most 1024")
    parser.add_argument("--data-seed", type=int, default=0, dest="data_seed",
                        help="seed of the data order and of the held-out split (shared by all candidates)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, dest="max_grad_norm",
                        help="gradient clipping per candidate (0: off)")
    parser.add_argument("--weight-decay", type=float, default=0.0, dest="weight_decay", help="AdamW weight decay")
    parser.add_argument("--schedule", default="constant", choices=["constant", "linear"],
                        help="learning-rate schedule after warm-up (linear: down to 0 at the last step)")
    parser.add_argument("--warmup-steps", type=int, default=0, dest="warmup_steps", help="linear warm-up steps")
    parser.add_argument("--encoder-hidden-size", type=int, dest="encoder_hidden_size",
                        help="hidden size of the P-tuning encoder or the prefix projection (default: PEFT's)")
    parser.add_argument("--prefix-projection", action="store_true", dest="prefix_projection",
                        help="prefix tuning through PEFT's two-layer projection (P-Tuning v2 reparameterisation)")
    parser.add_argument("--save-every", type=int, dest="save_every",
                        help="steps between checkpoints (default: --eval-every)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--no-progress", action="store_false", dest="progress",
                        help="hide the progress bar (shown by default)")
    parser.add_argument("--no-plot", action="store_false", dest="plot",
                        help="write no PNG plots (loss.png, sweep.png are written by default)")


def settings_from_args(args: argparse.Namespace):
    from .trainer import TrainSettings

    names = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in vars(args).items() if k in names})


def format_table(result) -> str:
    """One row per candidate, the best marked."""
    rows = [("", "candidate", "train loss", "eval loss", "eval acc")]
    for c in result["candidates"]:
        def fmt(value, spec=".4f"):
            return "-" if value is None else format(value, spec)
        rows.append(("*" if c["name"] == result["best"] else "", c["name"], fmt(c["final_train_loss"]),
                     fmt(c["final_eval_loss"]), fmt(c["final_eval_accuracy"], ".3f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def run_from_args(args: argparse.Namespace) -> int:
    from .trainer import TrainError, train

    try:
        result = train(settings_from_args(args))
    except TrainError as error:
        print(f"softprompt-kernels train: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    rate = result["train_tokens_per_second"]
    print(f"{result['steps']} steps in {result['seconds']:.1f} s" + (f" ({rate:.0f} tokens/s)" if rate else ""))
    if result["truncated_examples"]:
        print(f"{result['truncated_examples']} examples were cut to --max-length "
              f"{result['settings']['max_length']} tokens")
    print(f"best: {result['best']}; PEFT adapter in {args.out} (PeftModel.from_pretrained(model, {args.out!r}))")
    return 0
