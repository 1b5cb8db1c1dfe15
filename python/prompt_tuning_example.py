"""Prompt-tune a causal LM with Hugging Face PEFT, with and without softprompt_kernels, side by side.

    python python/prompt_tuning_example.py [--method prompt|prefix|p-tuning] [--steps 30] [--device cuda]

Builds a small Llama-shaped model from a config (nothing is downloaded), a synthetic task (continue a
repeated pattern), and trains two identical PEFT models for the same steps on the same batches: one as
PEFT runs it, one after ``softprompt_kernels.accelerate``. Prints loss, time per step and peak memory for
both; the loss curves agree (same math), the accelerated one is faster and lighter.
"""
import argparse
import copy
import time

import torch
import transformers
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from tqdm import tqdm

import softprompt_kernels as sk
from softprompt_kernels.profiling import peak_memory_mb


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
    """Rows that repeat a random pattern: learnable by a prompt alone."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        pattern = torch.randint(3, args.vocab, (args.batch, 8), generator=gen)
        ids = pattern.repeat(1, args.length // 8 + 1)[:, : args.length].to(device)
        yield ids, torch.ones_like(ids)


def train(model, args, device, label):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses, times = [], []
    for ids, mask in tqdm(batches(args, device), total=args.steps, desc=label, leave=False):
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())

    def one_step():  # measured once more, with gradients (what training holds at its peak)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.zero_grad()

    return losses, times, peak_memory_mb(one_step, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="prompt", choices=["prompt", "prefix", "p-tuning"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("-k", type=int, default=100, help="number of virtual tokens")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    base = build_model(args).to(device)
    results = {}
    for label in ("PEFT", "accelerated"):
        torch.manual_seed(1)  # the same prompt initialisation for both
        model = get_peft_model(copy.deepcopy(base), peft_config(args.method, args.k))
        if label == "accelerated":
            sk.accelerate(model)
        results[label] = train(model.train(), args, device, label)

    (peft_loss, peft_t, peft_mem), (acc_loss, acc_t, acc_mem) = results["PEFT"], results["accelerated"]
    print(f"{args.method} tuning, {args.steps} steps, batch {args.batch} x {args.length} tokens, k={args.k}, "
          f"{device.type}")
    print(f"{'step':>5} {'PEFT loss':>10} {'ours loss':>10} {'PEFT ms':>9} {'ours ms':>9}")
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{step:>5} {peft_loss[step]:>10.4f} {acc_loss[step]:>10.4f} {peft_t[step] * 1e3:>9.1f} "
              f"{acc_t[step] * 1e3:>9.1f}")
    median = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    print(f"median step: PEFT {median(peft_t):.1f} ms, accelerated {median(acc_t):.1f} ms "
          f"({median(peft_t) / median(acc_t):.2f}x)")
    print(f"peak memory of a training step: PEFT {peft_mem:.1f} MiB, accelerated {acc_mem:.1f} MiB")
    print(f"largest loss difference over the run: {max(abs(a - b) for a, b in zip(peft_loss, acc_loss)):.2e}")


if __name__ == "__main__":
    main()
