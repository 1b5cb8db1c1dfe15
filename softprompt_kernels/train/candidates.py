"""Candidates of a training run: one prompt configuration each (a sweep has several).

A candidate fixes what PEFT needs to create its adapter (method, ``num_virtual_tokens``,
initialisation) plus its own ``seed`` (the adapter's initial weights) and learning rate. ``--sweep
key=v1,v2`` options multiply out into the grid of candidates; without any, one candidate.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Sequence

import torch

METHODS = {"prompt": "PROMPT_TUNING", "p-tuning": "P_TUNING", "prefix": "PREFIX_TUNING"}
# The initialisations each method offers (PEFT's options, by their command-line names).
INITS = {"prompt": ("random", "vocab", "text:..."), "p-tuning": ("random",), "prefix": ("random", "zero")}
SWEEPABLE = ("num_virtual_tokens", "init", "seed", "lr")


@dataclass(frozen=True)
class Candidate:
    method: str                    # a key of METHODS
    num_virtual_tokens: int
    init: str                      # "random" | "vocab" | "zero" | "text:<words>"
    seed: int
    lr: float

    @property
    def name(self) -> str:
        """A PEFT adapter name (no dots: PEFT keys modules by it)."""
        init = self.init if not self.init.startswith("text:") else "text"
        lr = f"{self.lr:g}".replace(".", "p").replace("-", "m")
        return f"k{self.num_virtual_tokens}-{init}-s{self.seed}-lr{lr}"

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, **asdict(self)}


def check_candidate(candidate: Candidate) -> None:
    if candidate.method not in METHODS:
        raise ValueError(f"--method must be one of {sorted(METHODS)}, got {candidate.method!r}")
    if candidate.num_virtual_tokens < 1:
        raise ValueError(f"--num-virtual-tokens must be >= 1, got {candidate.num_virtual_tokens}")
    if not candidate.lr > 0:
        raise ValueError(f"--lr must be > 0, got {candidate.lr}")
    allowed = INITS[candidate.method]
    is_text = candidate.init.startswith("text:")
    if (is_text and "text:..." not in allowed) or (not is_text and candidate.init not in allowed):
        raise ValueError(f"--init {candidate.init!r} does not apply to --method {candidate.method}; "
                         f"it takes {list(allowed)}")
    if is_text and not candidate.init[len("text:"):].strip():
        raise ValueError("--init text: needs the text, e.g. --init 'text:Classify the sentiment'")


def parse_sweeps(options: Sequence[str]) -> Dict[str, List[str]]:
    """``["num_virtual_tokens=10,20", "init=random|vocab"]`` -> ``{"num_virtual_tokens": ["10", "20"], ...}``.

    Values are separated by ``,`` or ``|`` (one of the two per option); text inits may hold commas, so an
    option with a ``text:`` value splits on ``|`` only."""
    sweeps: Dict[str, List[str]] = {}
    for option in options:
        key, sep, values = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--sweep takes KEY=V1,V2,..., got {option!r}")
        if key not in SWEEPABLE:
            raise ValueError(f"--sweep {key!r} is not sweepable; sweepable: {list(SWEEPABLE)}")
        if key in sweeps:
            raise ValueError(f"--sweep {key} given twice")
        # text inits may hold commas: 'init=random,text:a, b' is ambiguous, so text values split on '|'
        if "text:" not in values and "|" in values and "," in values:
            raise ValueError(f"--sweep {key}: separate the values with ',' or with '|', not both: {values!r}")
        parts = values.split("|") if "text:" in values or "|" in values else values.split(",")
        parts = [p.strip() for p in parts if p.strip()]
        if len(set(parts)) != len(parts):
            raise ValueError(f"--sweep {key} repeats a value: {parts}")
        sweeps[key] = parts
    return sweeps


def _convert(key: str, value: str):
    try:
        if key in ("num_virtual_tokens", "seed"):
            return int(value)
        if key == "lr":
            return float(value)
    except ValueError:
        kind = "an integer" if key != "lr" else "a number"
        raise ValueError(f"--sweep {key}: {value!r} is not {kind}") from None
    return value


def grid(base: Candidate, sweeps: Dict[str, List[str]]) -> List[Candidate]:
    """Every combination of the swept values over ``base``, in the order the options were given."""
    keys = list(sweeps)
    candidates = []
    for values in itertools.product(*(sweeps[k] for k in keys)):
        candidate = replace(base, **{k: _convert(k, v) for k, v in zip(keys, values)})
        check_candidate(candidate)
        candidates.append(candidate)
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"the sweep gives candidates with the same name: {names}")
    return candidates


def peft_config(candidate: Candidate, task_type: str, model_dir: str, encoder_hidden_size=None,
                prefix_projection: bool = False):
    """The PEFT config that creates this candidate's adapter."""
    import peft

    common = dict(task_type=task_type, num_virtual_tokens=candidate.num_virtual_tokens)
    if candidate.method == "prompt":
        if candidate.init.startswith("text:"):
            return peft.PromptTuningConfig(**common, prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                           prompt_tuning_init_text=candidate.init[len("text:"):],
                                           tokenizer_name_or_path=model_dir)
        init = {"random": peft.PromptTuningInit.RANDOM, "vocab": peft.PromptTuningInit.SAMPLE_VOCAB}[candidate.init]
        return peft.PromptTuningConfig(**common, prompt_tuning_init=init)
    if candidate.method == "p-tuning":
        extra = {"encoder_hidden_size": encoder_hidden_size} if encoder_hidden_size else {}
        return peft.PromptEncoderConfig(**common, **extra)
    extra = {"encoder_hidden_size": encoder_hidden_size} if encoder_hidden_size else {}
    return peft.PrefixTuningConfig(**common, prefix_projection=prefix_projection,
                                   init_weights="zero" if candidate.init == "zero" else None, **extra)


def add_adapters(base_model, candidates: Sequence[Candidate], configs) -> "object":
    """One PeftModel holding every candidate's adapter, each created right after ``manual_seed(seed)``.

    The same call with one candidate is a separate run's model, so a candidate's initial weights do
    not depend on the others.
    """
    import peft

    peft_model = None
    for candidate, config in zip(candidates, configs):
        torch.manual_seed(candidate.seed)
        if peft_model is None:
            peft_model = peft.get_peft_model(base_model, config, adapter_name=candidate.name)
        else:
            peft_model.add_adapter(candidate.name, config)
    return peft_model


def trainable_parameters(peft_model, name: str) -> List[torch.nn.Parameter]:
    """The parameters of one adapter: its prompt encoder and any per-adapter head (modules_to_save)."""
    params = list(peft_model.prompt_encoder[name].parameters())
    for module in peft_model.modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, torch.nn.ModuleDict) and name in copies:
            params.extend(copies[name].parameters())
    return params
