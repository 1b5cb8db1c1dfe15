"""End-to-end training-step benchmark: PEFT prompt learning vs the accelerated model vs the bare model.

Providers of a case (one forward + backward with labels, gradients by ``torch.autograd.grad`` so that
nothing accumulates between calls):

- ``bare``: the frozen model alone, gradients to its input embeddings (what prompt tuning can at best cost);
- ``peft``: Hugging Face PEFT as users run it;
- ``accelerated``: the same PEFT model after ``softprompt_kernels.accelerate``.

Every provider gets its own copy of the same weights (``accelerate`` changes a model in place).

Methods: prompt and prefix tuning, multitask prompt tuning (rows cycling through ``tasks`` tasks), CPT (a context
of k tokens as in-context examples, PEFT's default loss options, every text row typed input / output / label),
Cartridges (PEFT's default of one frozen slot) and ADAPTION_PROMPT (k adapter tokens in every layer; its case
runs once ``accelerate`` supports the method, and is skipped with a note before).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .harness import CaseSetup, Suite, Timing

BENCH = "peft_training_step"
CASE_KEY = ("model (h = hidden, L = layers, H = q/kv heads), method, B = rows, n = text tokens, k = virtual tokens; "
            "one forward + backward with labels")
PROVIDERS = ("bare", "peft", "accelerated")


METHODS = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "multitask": "MULTITASK_PROMPT_TUNING",
           "cpt": "CPT", "cartridge": "CARTRIDGE", "adaption": "ADAPTION_PROMPT"}  # case method -> PEFT's type
# accelerated vs PEFT, per method (docs/DESIGN.md section 7); methods without a goal are reported, not judged
SPEEDUP_GOALS = {"prompt": 1.6, "multitask": 1.6, "cpt": 1.6, "prefix": 1.1, "cartridge": 1.1}


@dataclass(frozen=True)
class Case:
    method: str  # a key of METHODS
    B: int
    n: int
    k: int
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 1000
    intermediate: int = 688
    dtype: str = "float32"
    family: str = "llama"  # "llama", "gemma3_text" (sliding + full layers), "gpt_oss" (sinks, windows, experts)
    tasks: int = 4  # multitask: the tasks of the batch (row b has task b % tasks)

    @property
    def name(self) -> str:
        tasks = f" {self.tasks} tasks" if self.method == "multitask" else ""
        return (f"{self.family} h{self.hidden} L{self.layers} H{self.heads}/{self.kv_heads} {self.method}{tasks} "
                f"B{self.B} n{self.n} k{self.k} {self.dtype}")

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def _family_config(case: Case):
    """A model of the case's shape in its family, with the family's attention features as its real checkpoints
    set them (Gemma 3: five sliding layers of 512 per full one; gpt-oss: alternating 128-token windows, sinks)."""
    import transformers

    common = dict(hidden_size=case.hidden, intermediate_size=case.intermediate, num_hidden_layers=case.layers,
                  num_attention_heads=case.heads, num_key_value_heads=case.kv_heads, vocab_size=case.vocab,
                  max_position_embeddings=case.n + case.k + 16, attention_dropout=0.0)
    if case.family == "llama":
        return transformers.LlamaConfig(**common), "sdpa"
    head_dim = case.hidden // case.heads
    if case.family == "gemma3_text":
        layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(case.layers)]
        return transformers.Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=512,
                                             layer_types=layer_types), "sdpa"
    if case.family == "gpt_oss":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(case.layers)]
        config = transformers.GptOssConfig(**common, head_dim=head_dim, sliding_window=128, layer_types=layer_types,
                                           num_local_experts=4, num_experts_per_tok=2)
        return config, "eager"  # transformers has no SDPA path for attention sinks
    raise ValueError(f"unknown family {case.family!r}")


def case_model(case: Case, device):
    import transformers

    config, attention = _family_config(case)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return model.to(device=device, dtype=getattr(torch, case.dtype)).train()


def case_peft_config(case: Case):
    import peft

    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=case.k)
    if case.method == "prompt":
        return peft.PromptTuningConfig(**common)
    if case.method == "prefix":
        return peft.PrefixTuningConfig(**common)
    if case.method == "multitask":
        return peft.MultitaskPromptTuningConfig(**common, num_tasks=case.tasks)
    if case.method == "cpt":
        tokens, types = _cpt_context(case)
        return peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=tokens, cpt_mask=[1] * case.k,
                              cpt_tokens_type_mask=types)
    if case.method == "cartridge":
        return peft.CartridgeConfig(**common)
    if case.method == "adaption":
        return peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=case.k, adapter_layers=case.layers)
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {case.method!r}")


def _cpt_context(case: Case):
    """CPT's context: k tokens of in-context examples of 25 tokens (input template, 20 input tokens, output
    template, 3 label tokens), each example i typed 4i + 1 .. 4i + 4 as CPT's type mask wants."""
    tokens = [1 + (7 * i) % (case.vocab - 1) for i in range(case.k)]
    example = [1] + [2] * 20 + [3] + [4] * 3
    types = [t + 4 * (i // len(example)) for i, t in enumerate(example * (case.k // len(example) + 1))][: case.k]
    return tokens, types


def _text_types(case: Case) -> torch.Tensor:
    """CPT's ``input_type_mask`` of the text rows [B, n]: input template, input, output template, label tokens."""
    label = max(1, case.n // 5)
    row = [1] + [2] * (case.n - label - 2) + [3] + [4] * label
    return torch.tensor(row[: case.n])[None].expand(case.B, -1)


def _extra_inputs(case: Case, device) -> Callable[[], Dict[str, Any]]:
    """The method's own forward arguments, made fresh per call (PEFT's CPT writes into input_type_mask)."""
    if case.method == "multitask":
        task_ids = (torch.arange(case.B) % case.tasks).to(device)
        return lambda: {"task_ids": task_ids}
    if case.method == "cpt":
        types = _text_types(case).to(device)
        return lambda: {"input_type_mask": types.clone()}
    return dict


def flops(case: Case) -> float:
    """Approximate: 6 FLOPs per parameter and token of the frozen matmuls (forward + backward)."""
    per_layer = 4 * case.hidden * case.hidden + 3 * case.hidden * case.intermediate
    params = case.layers * per_layer + case.hidden * case.vocab
    return 6.0 * params * case.B * case.n


def build(case: Case, device, only: Optional[Sequence[str]] = None) -> CaseSetup:
    import softprompt_kernels as sk
    from peft import get_peft_model

    from ..hf.accelerate import SUPPORTED_METHODS

    if METHODS[case.method] not in SUPPORTED_METHODS:  # a method the case table names before accelerate() takes it
        return CaseSetup(config=case.config(), flops=flops(case), bytes=0.0, providers={},
                         skipped={case.name: f"{METHODS[case.method]} is not accelerated yet; case skipped"})
    wanted = (lambda name: only is None or name in only)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, case.vocab, (case.B, case.n), generator=gen).to(device)
    mask = torch.ones_like(ids)
    base = case_model(case, device)
    for p in base.parameters():
        p.requires_grad_(False)
    providers: Dict[str, Callable[[], Any]] = {}
    if wanted("bare"):
        def bare():
            embeds = base.get_input_embeddings()(ids).detach().requires_grad_()
            loss = base(inputs_embeds=embeds, attention_mask=mask, labels=ids).loss
            return torch.autograd.grad(loss, [embeds])
        providers["bare"] = bare
    for name in ("peft", "accelerated"):
        if not wanted(name):
            continue
        torch.manual_seed(2)  # the same adapter weights for both
        model = get_peft_model(copy.deepcopy(base), case_peft_config(case))
        if name == "accelerated":
            sk.accelerate(model)
        params = [p for p in model.parameters() if p.requires_grad]
        providers[name] = _step(model, params, ids, mask, _extra_inputs(case, device))
    return CaseSetup(config=case.config(), flops=flops(case), bytes=0.0, providers=providers)


def _step(model, params, ids, mask, extra=dict):
    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, **extra()).loss
        return torch.autograd.grad(loss, params)
    return step


def known_providers() -> List[str]:
    return list(PROVIDERS)


_ACCEPTANCE_CPU = Case("prompt", B=16, n=128, k=100)  # the tiny Llama-shaped model of the CPU goals (docs/DESIGN.md section 7)
_GPU_1B = Case("prompt", B=32, n=256, k=100, hidden=2048, layers=16, heads=32, kv_heads=8, vocab=32000,
               intermediate=5632, dtype="bfloat16")

def goals(records) -> List[str]:
    """The CPU training-step goals (docs/DESIGN.md section 7), per case: accelerated vs PEFT and vs the bare model."""
    by: Dict[str, Dict[str, Any]] = {}
    for r in records:
        by.setdefault(r.config["name"], {})[r.provider] = r
    lines = []
    for name, recs in by.items():
        if not {"peft", "accelerated", "bare"} <= set(recs):
            continue
        method = recs["accelerated"].config["method"]
        speedup = recs["peft"].ms / recs["accelerated"].ms
        vs_bare = recs["accelerated"].ms / recs["bare"].ms
        want = SPEEDUP_GOALS.get(method)
        if want is None:
            lines.append(f"{name}: {speedup:.2f}x faster than PEFT, {vs_bare:.2f}x the bare model's time (no goal)")
            continue
        line = f"{name}: {speedup:.2f}x faster than PEFT (goal >= {want}x: {'met' if speedup >= want else 'NOT met'})"
        if method == "prompt":
            line += f", {vs_bare:.2f}x the bare model's time (goal <= 1.15x: {'met' if vs_bare <= 1.15 else 'NOT met'})"
        lines.append(line)
    return lines


SUITES: Dict[str, Suite] = {
    # 20 s of interleaved rounds per case: 5 s left the accelerated/bare ratio +-5% apart between runs on
    # a shared 2-core machine; longer runs narrow the sampling noise, but slow phases of the machine still
    # move the ratios by a few percent from run to run (report several runs).
    "peft-cpu": Suite("peft-cpu", "cpu", [_ACCEPTANCE_CPU, replace(_ACCEPTANCE_CPU, method="prefix"),
                                          replace(_ACCEPTANCE_CPU, family="gemma3_text"),
                                          replace(_ACCEPTANCE_CPU, family="gpt_oss"),
                                          *(replace(_ACCEPTANCE_CPU, method=m)
                                            for m in ("multitask", "cpt", "cartridge", "adaption"))],
                      Timing(reps=20, warmup=2, min_time_s=20.0)),
    # the methods of issue 13 beside their references, on their own (about 8 minutes): multitask both as in
    # target-task adaptation (every row one task) and as in multi-task training (4 tasks in the batch)
    "peft-cpu-methods": Suite("peft-cpu-methods", "cpu",
                              [_ACCEPTANCE_CPU, replace(_ACCEPTANCE_CPU, method="prefix"),
                               replace(_ACCEPTANCE_CPU, method="multitask", tasks=1),
                               *(replace(_ACCEPTANCE_CPU, method=m) for m in ("multitask", "cpt", "cartridge",
                                                                              "adaption"))],
                              Timing(reps=20, warmup=2, min_time_s=20.0)),
    "peft-cpu-quick": Suite("peft-cpu-quick", "cpu", [Case("prompt", B=2, n=16, k=8, hidden=64, layers=2, heads=4,
                                                           kv_heads=2, vocab=100, intermediate=96)],
                            Timing(reps=3, warmup=1, min_time_s=0.05)),
    "peft-gpu": Suite("peft-gpu", "cuda", [_GPU_1B, replace(_GPU_1B, method="prefix")],
                      Timing(reps=5, min_time_s=1.0)),
}
