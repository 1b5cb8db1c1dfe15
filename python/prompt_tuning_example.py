"""Prompt-tune a causal LM with Hugging Face PEFT, with and without softprompt_kernels, side by side.

    python python/prompt_tuning_example.py [--method prompt|prefix|p-tuning] [--steps 30] [--device cuda]

Builds a small Llama-shaped model from a config (nothing is downloaded) and a synthetic task a soft
prompt can learn on a frozen model: every row is text drawn from one fixed "topic" of 16 tokens, so
the prompt has to steer the model toward that topic (the loss falls from about ln(vocab), steadily
but slowly on a randomly initialised model, toward ln(16)). Two identical PEFT models train on the same batches, one as PEFT runs it and one after
``softprompt_kernels.accelerate``, their steps interleaved (alternating which goes first) so that
a slow phase of the machine hits both alike. Prints the loss of both, time per step and peak memory;
the loss curves agree (same math), the accelerated one is faster and lighter.
"""
import argparse
import copy
import math
import statistics
import time

import torch
import transformers
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from tqdm import tqdm

import softprompt_kernels as sk
from softprompt_kernels.profiling import peak_memory_mb

METHOD_NAMES = {"prompt": "prompt tuning", "prefix": "prefix tuning", "p-tuning": "P-tuning"}
TOPIC_SIZE = 16


def build_model(args):
    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                      vocab_size=args.vocab, max_position_embeddings=args.length + args.k + 8,
                                      attention_dropout=0.0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def peft_config(method, k):
    return {"prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k),
            "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k),
            "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=k,
                                                    encoder_hidden_size=128)}[method]()


def batches(args, device):
    """Rows of tokens drawn from one fixed topic (the same 16 tokens for every row and step)."""
    gen = torch.Generator().manual_seed(1)
    topic = torch.randperm(args.vocab, generator=gen)[:TOPIC_SIZE]
    for _ in range(args.steps):
        ids = topic[torch.randint(0, TOPIC_SIZE, (args.batch, args.length), generator=gen)].to(device)
        yield ids, torch.ones_like(ids)


class Trainee:
    """One PEFT model with its optimizer, its losses and its step times."""

    def __init__(self, model, lr):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.losses, self.seconds = [], []

    def step(self, ids, mask, device):
        start = time.perf_counter()
        loss = self.model(input_ids=ids, attention_mask=mask, labels=ids).loss
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())

    def peak_memory(self, ids, mask, device):
        def one_step():  # forward + backward: what training holds at its peak
            self.model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            self.optimizer.zero_grad()
        return peak_memory_mb(one_step, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", default="prompt", choices=list(METHOD_NAMES), help="PEFT method")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each model")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch")
    parser.add_argument("--length", type=int, default=128, help="text tokens per row")
    parser.add_argument("-k", type=int, default=100, help="number of virtual tokens")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the Llama-shaped model")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary size")
    parser.add_argument("--lr", type=float, default=0.3, help="AdamW learning rate (0.3: Lester et al.'s for prompts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args()
    device = torch.device(args.device)

    base = build_model(args).to(device)
    trainees = {}
    for label in ("PEFT", "accelerated"):
        torch.manual_seed(1)  # the same prompt initialisation for both
        model = get_peft_model(copy.deepcopy(base), peft_config(args.method, args.k))
        trainees[label] = Trainee(sk.accelerate(model) if label == "accelerated" else model, args.lr)
    order = list(trainees)
    for step, (ids, mask) in enumerate(tqdm(batches(args, device), total=args.steps, desc=METHOD_NAMES[args.method])):
        for label in (order if step % 2 == 0 else order[::-1]):
            trainees[label].step(ids, mask, device)
    peft, ours = trainees["PEFT"], trainees["accelerated"]

    print(f"{METHOD_NAMES[args.method]}, {args.steps} steps, batch {args.batch} x {args.length} tokens, k={args.k}, "
          f"{device.type}; the loss starts near ln({args.vocab}) = {math.log(args.vocab):.2f}, the topic's entropy is "
          f"ln({TOPIC_SIZE}) = {math.log(TOPIC_SIZE):.2f}")
    print(f"{'step':>5} {'PEFT loss':>10} {'ours loss':>10} {'PEFT ms':>9} {'ours ms':>9}")
    for step in sorted(set(range(0, args.steps, max(1, args.steps // 10))) | {args.steps - 1}):
        print(f"{step:>5} {peft.losses[step]:>10.4f} {ours.losses[step]:>10.4f} {peft.seconds[step] * 1e3:>9.1f} "
              f"{ours.seconds[step] * 1e3:>9.1f}")
    peft_ms, ours_ms = (1e3 * statistics.median(t.seconds[1:] or t.seconds) for t in (peft, ours))  # step 0 warms up
    print(f"median step (interleaved): PEFT {peft_ms:.1f} ms, accelerated {ours_ms:.1f} ms ({peft_ms / ours_ms:.2f}x)")
    print(f"peak memory of a training step: PEFT {peft.peak_memory(ids, mask, device):.1f} MiB, "
          f"accelerated {ours.peak_memory(ids, mask, device):.1f} MiB")
    print(f"largest loss difference over the run: {max(abs(a - b) for a, b in zip(peft.losses, ours.losses)):.2e}")


if __name__ == "__main__":
    main()
