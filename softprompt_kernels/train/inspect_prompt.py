"""What a trained soft prompt looks like: ``softprompt-kernels inspect ADAPTER --model DIR``.

For a PEFT prompt-learning adapter it reports:

- PROMPT_TUNING and P_TUNING (the virtual tokens live in the model's input-embedding space; for
  P-tuning they are the prompt encoder's *output*): per virtual token its L2 norm, the percentile of
  that norm among the vocabulary's embedding norms (ties count half), and the ``top_k`` vocabulary
  tokens nearest to it by cosine similarity; the vocabulary's median norm once for the adapter.
- PREFIX_TUNING (the virtual tokens are per-layer attention keys and values, not embeddings): per
  layer the mean and max norm of the prefix keys and of the prefix values over virtual tokens and
  heads (each norm over one head's ``head_dim``), and per virtual token its key and value norm
  (over all heads) summed over layers. Nearest vocabulary tokens do not apply and are reported as
  ``None`` with the reason.

Caveat: nearest tokens are a weak explanation of a soft prompt. Khashabi et al., "Prompt
Waywardness: The Curious Case of Discretized Interpretation of Continuous Prompts" (NAACL 2022) show
that prompts which solve a task can project onto arbitrary, even contradictory, text. A large norm
percentile says the prompt sits off the vocabulary's manifold, where nearest tokens mean even less.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

CAVEAT = ('nearest tokens are a weak explanation of a soft prompt: Khashabi et al., "Prompt Waywardness: '
          'The Curious Case of Discretized Interpretation of Continuous Prompts" (NAACL 2022) show prompts '
          'that solve a task can project onto arbitrary, even contradictory, text.')
PREFIX_REASON = ("prefix tuning learns per-layer attention keys and values, not input embeddings: "
                 "there is no vocabulary to compare them with")
EMBEDDING_TYPES = ("PROMPT_TUNING", "P_TUNING")
# hf/compat.py's KV_PREFIX_TYPES (prefix tuning and Cartridges); spelled out, not imported: the CLI builds this
# command's parser on every invocation, and importing softprompt_kernels.hf would load transformers for all of them
PREFIX_TYPES = ("PREFIX_TUNING", "CARTRIDGE")
# Vocabulary rows converted to float32 at a time: bounds the extra memory for 150k x 8k tables.
VOCAB_CHUNK = 16384
PROG = "softprompt-kernels inspect"


# --- the library function


def inspect_adapter(peft_model, tokenizer=None, top_k: int = 5, adapter: Optional[str] = None) -> Dict[str, Any]:
    """The report on ``peft_model``'s prompt-learning adapter (the active one unless ``adapter`` names one).

    ``tokenizer`` (optional) decodes nearest-token ids with ``convert_ids_to_tokens``; without one the
    report has ids only (``"token": None``). The result is JSON-serialisable; ``format_table`` renders it.
    """
    from ..hf import compat

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    config = getattr(peft_model, "peft_config", None)
    if not compat.is_peft_prompt_model(peft_model) or not config:
        raise ValueError("peft_model: expected a PEFT model with a prompt-learning adapter, "
                         f"got {type(peft_model).__name__}")
    config = compat.adapter_config(peft_model, adapter)
    method = compat.peft_type_name(config)
    if method not in EMBEDDING_TYPES + PREFIX_TYPES:
        raise ValueError(f"peft_model: adapter type {method} is not one inspect handles "
                         f"(expected one of {EMBEDDING_TYPES + PREFIX_TYPES})")
    base = peft_model.get_base_model()
    report: Dict[str, Any] = {
        "adapter_type": method,
        "task_type": compat.task_type_name(config),
        "num_virtual_tokens": int(config.num_virtual_tokens),
        "model_type": getattr(getattr(base, "config", None), "model_type", None),
        "top_k": top_k,
    }
    encoder = compat.prompt_encoder(peft_model, adapter)
    with torch.no_grad(), _eval_mode(encoder):
        if method in EMBEDDING_TYPES:
            report.update(_embedding_report(peft_model, base, config, tokenizer, top_k, adapter))
        else:
            report.update(_prefix_report(peft_model, config, adapter))
    report["caveat"] = CAVEAT
    return report


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Eval mode for one block (P-tuning's encoder may have dropout), restoring the caller's mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _embedding_report(peft_model, base, config, tokenizer, top_k, adapter) -> Dict[str, Any]:
    from ..hf.prompts import prompt_encoder_output

    k = int(config.num_virtual_tokens)
    # Encoder-decoder models keep num_transformer_submodules copies of the table: the first k rows suffice.
    prompts = prompt_encoder_output(peft_model, adapter)[:k].detach().to("cpu", torch.float64)
    vocab = base.get_input_embeddings().weight
    if prompts.shape[-1] != vocab.shape[-1]:
        raise ValueError(f"peft_model: the virtual tokens have width {prompts.shape[-1]} but the input "
                         f"embeddings {vocab.shape[-1]} (an adapter made for another model?)")
    vocab_norms, cosines, ids = _scan_vocabulary(vocab, prompts, top_k)
    norms = prompts.norm(dim=-1)
    below = (vocab_norms[None, :] < norms[:, None]).sum(-1).double()
    ties = (vocab_norms[None, :] == norms[:, None]).sum(-1).double()
    percentiles = 100.0 * (below + 0.5 * ties) / vocab_norms.numel()
    rows = [{"index": i, "norm": float(norms[i]), "norm_percentile": float(percentiles[i])} for i in range(k)]
    nearest = [[{"id": int(t), "token": _token_string(tokenizer, int(t)), "cosine": float(c)}
                for t, c in zip(ids[i].tolist(), cosines[i].tolist())] for i in range(k)]
    return {"space": "input_embeddings", "vocab_size": int(vocab_norms.numel()),
            "vocab_median_norm": float(vocab_norms.median()), "virtual_tokens": rows,
            "nearest_tokens": nearest, "nearest_tokens_reason": None}


def _scan_vocabulary(vocab: torch.Tensor, prompts: torch.Tensor, top_k: int):
    """Vocabulary norms ``[V]`` (float64) and each prompt row's top-k cosines and ids ``[k, top_k]``.

    Cosine is a matmul of unit vectors in float32 (a zero row, such as a padding row, scores 0); the
    vocabulary is converted chunk by chunk so a large one is never copied whole.
    """
    unit = F.normalize(prompts.float(), dim=-1)
    norms, cosines = [], []
    for start in range(0, vocab.shape[0], VOCAB_CHUNK):
        rows = vocab[start:start + VOCAB_CHUNK].detach().to("cpu", torch.float32)
        norms.append(rows.double().norm(dim=-1))
        cosines.append(unit @ F.normalize(rows, dim=-1).T)
    values, ids = torch.cat(cosines, dim=1).topk(min(top_k, vocab.shape[0]), dim=-1)
    return torch.cat(norms), values, ids


def _token_string(tokenizer, token_id: int) -> Optional[str]:
    # Past the tokenizer's length (a vocabulary padded for speed, or the specials-only tokenizer transformers
    # makes for a directory without tokenizer files) an id has no string: "[UNK]" would mislead.
    if tokenizer is None or (hasattr(tokenizer, "__len__") and token_id >= len(tokenizer)):
        return None
    try:
        token = tokenizer.convert_ids_to_tokens(token_id)
    except (IndexError, KeyError, ValueError, OverflowError, TypeError):
        return None
    return token if isinstance(token, str) else None


def _prefix_report(peft_model, config, adapter) -> Dict[str, Any]:
    from ..hf.prompts import prefix_tuning_layers

    layers = []
    key_per_token = value_per_token = 0.0
    for index, (keys, values) in enumerate(prefix_tuning_layers(peft_model, adapter)):
        keys, values = keys[0].detach().to("cpu", torch.float64), values[0].detach().to("cpu", torch.float64)
        key_norms, value_norms = keys.norm(dim=-1), values.norm(dim=-1)  # [Hkv, k], per head
        layers.append({"layer": index, "key_norm_mean": float(key_norms.mean()), "key_norm_max": float(key_norms.max()),
                       "value_norm_mean": float(value_norms.mean()), "value_norm_max": float(value_norms.max())})
        key_per_token = key_per_token + keys.pow(2).sum(dim=(0, 2)).sqrt()  # over all heads: [k]
        value_per_token = value_per_token + values.pow(2).sum(dim=(0, 2)).sqrt()
    heads, head_dim = int(keys.shape[0]), int(keys.shape[-1])
    rows = [{"index": i, "key_norm": float(key_per_token[i]), "value_norm": float(value_per_token[i])}
            for i in range(int(config.num_virtual_tokens))]
    return {"space": "prefix_key_values", "num_layers": len(layers), "num_kv_heads": heads, "head_dim": head_dim,
            "layers": layers, "virtual_tokens": rows, "nearest_tokens": None, "nearest_tokens_reason": PREFIX_REASON}


# --- the table


def format_table(report: Dict[str, Any]) -> str:
    """``report`` (from ``inspect_adapter``) as an aligned plain-text table, the caveat last."""
    lines = []
    if report.get("nearest_tokens") is not None:
        lines.append(f"{report['adapter_type']} adapter on {report['model_type']}: {report['num_virtual_tokens']} "
                     f"virtual tokens in the input-embedding space; vocabulary of {report['vocab_size']}, "
                     f"median norm {report['vocab_median_norm']:.4g}")
        rows = [[str(row["index"]), f"{row['norm']:.4g}", f"{row['norm_percentile']:.1f}",
                 " ".join(f"{_show(n)}({n['cosine']:.2f})" for n in nearest)]
                for row, nearest in zip(report["virtual_tokens"], report["nearest_tokens"])]
        lines += _render(["token", "norm", "norm pct", f"nearest tokens (cosine, top {report['top_k']})"], rows,
                         text_last=True)
    else:
        lines.append(f"{report['adapter_type']} adapter on {report['model_type']}: {report['num_virtual_tokens']} "
                     f"virtual tokens as keys/values of {report['num_layers']} layers x {report['num_kv_heads']} "
                     f"kv heads x head dim {report['head_dim']}")
        stats = ("key_norm_mean", "key_norm_max", "value_norm_mean", "value_norm_max")
        lines += _render(["layer", "key norm mean", "key norm max", "value norm mean", "value norm max"],
                         [[str(layer["layer"]), *(f"{layer[name]:.4g}" for name in stats)]
                          for layer in report["layers"]])
        lines.append("")
        lines += _render(["token", "key norm (sum over layers)", "value norm (sum over layers)"],
                         [[str(row["index"]), f"{row['key_norm']:.4g}", f"{row['value_norm']:.4g}"]
                          for row in report["virtual_tokens"]])
        lines.append(f"nearest tokens: n/a ({report['nearest_tokens_reason']})")
    lines.append(f"caveat: {report['caveat']}")
    return "\n".join(lines)


def _show(nearest: Dict[str, Any]) -> str:
    token = nearest["token"]
    if token is None:
        return f"#{nearest['id']}"
    # Whitespace or control characters would break the row: show those tokens quoted and escaped.
    return token if token and token.isprintable() and not any(c.isspace() for c in token) else repr(token)


def _render(headers: Sequence[str], rows: List[List[str]], text_last: bool = False) -> List[str]:
    """Columns right-aligned to their widest cell; with ``text_last`` the last one is free text, left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        if not text_last:
            return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))
        body = [cell.rjust(width) for cell, width in zip(cells[:-1], widths)]
        return "  ".join(body + [cells[-1]]).rstrip()

    return [line(list(headers))] + [line(row) for row in rows]


# --- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_format import HelpFormatter

    parser.formatter_class = HelpFormatter
    parser.add_argument("adapter", help="a PEFT prompt-learning adapter directory (written by save_pretrained)")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="the base model directory (required unless the adapter's base_model_name_or_path "
                             "is a local directory)")
    parser.add_argument("--top-k", type=int, default=5, metavar="N", help="nearest vocabulary tokens per virtual token")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the report as JSON to PATH ('-': print JSON to stdout instead of the table)")


class InspectError(ValueError):
    """A problem with the command's input; ``run_from_args`` reports it as one line (no traceback)."""


def run_from_args(args: argparse.Namespace) -> int:
    """Loads the adapter onto its base model, prints the table (or JSON), returns 0; 2 on bad input."""
    try:
        if args.top_k < 1:
            raise InspectError(f"--top-k must be at least 1, got {args.top_k}")
        peft_model, tokenizer = load(args.adapter, args.model)
        report = inspect_adapter(peft_model, tokenizer, top_k=args.top_k)
    except ValueError as error:  # InspectError, or inspect_adapter's (an adapter that does not fit its model)
        print(f"{PROG}: {_first_line(error)}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(report))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        except OSError as error:
            print(f"{PROG}: cannot write --json {args.json!r}: {_first_line(error)}", file=sys.stderr)
            return 2
    return 0


def load(adapter: str, model: Optional[str] = None):
    """``(peft_model, tokenizer or None)`` for an adapter directory and its base model directory.

    The base model's auto class follows the adapter's task type; ``model`` defaults to the adapter's
    ``base_model_name_or_path`` when that is a local directory. Raises ``InspectError`` naming the problem.
    """
    from peft import PeftConfig

    from ..hf import compat

    if not os.path.isdir(adapter):
        raise InspectError(f"adapter directory {adapter!r} does not exist")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise InspectError(f"{adapter!r} has no adapter_config.json "
                           "(expected a PEFT adapter directory written by save_pretrained)")
    try:
        config = PeftConfig.from_pretrained(adapter)
    except (OSError, ValueError, TypeError) as error:
        raise InspectError(f"cannot read the adapter config in {adapter!r}: {_first_line(error)}") from None
    method = compat.peft_type_name(config)
    if not config.is_prompt_learning:
        raise InspectError(f"{adapter!r} holds a {method} adapter, not a prompt-learning adapter "
                           f"(expected one of {EMBEDDING_TYPES + PREFIX_TYPES})")
    if method not in EMBEDDING_TYPES + PREFIX_TYPES:
        raise InspectError(f"{adapter!r} holds a {method} adapter, which inspect does not handle "
                           f"(expected one of {EMBEDDING_TYPES + PREFIX_TYPES})")
    if model is None:
        model = config.base_model_name_or_path
        if not model or not os.path.isdir(model):
            raise InspectError(f"--model is required: the adapter's base_model_name_or_path {model!r} "
                            "is not a local directory")
    elif not os.path.isdir(model):
        raise InspectError(f"--model directory {model!r} does not exist")
    try:
        peft_model = _load_model(adapter, model, config)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise InspectError(f"cannot load {adapter!r} onto the model in {model!r}: {_first_line(error)}") from None
    return peft_model, _load_tokenizer(model)


def _load_model(adapter: str, model: str, config):
    import transformers
    from peft import PeftModel

    from ..hf import compat

    task = compat.task_type_name(config)
    auto = {"CAUSAL_LM": transformers.AutoModelForCausalLM,
            "SEQ_CLS": transformers.AutoModelForSequenceClassification,
            "TOKEN_CLS": transformers.AutoModelForTokenClassification,
            "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
            "QUESTION_ANS": transformers.AutoModelForQuestionAnswering}.get(task, transformers.AutoModel)
    kwargs = {}
    labels = _labels(adapter) if task == "SEQ_CLS" else None
    if labels is not None:
        # The base directory's own head may have another label count: the adapter's saved head replaces it.
        kwargs.update(num_labels=len(labels), ignore_mismatched_sizes=True)
    base = auto.from_pretrained(model, **kwargs)
    try:
        return PeftModel.from_pretrained(base, adapter)
    except RuntimeError as error:
        if task not in ("SEQ_CLS", "TOKEN_CLS") or "size mismatch" not in str(error):
            raise
    # A saved classifier head of another shape: only the embeddings and the prompt matter here, so load the
    # bare encoder and the adapter as a feature-extraction one (the head's weights are ignored).
    config.task_type = "FEATURE_EXTRACTION"
    return PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(model), adapter, config=config)


def _labels(adapter: str) -> Optional[List[str]]:
    """The label names in ``ADAPTER/labels.json`` (a JSON list), or None when there is no such file."""
    path = os.path.join(adapter, "labels.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            labels = json.load(f)
    except (OSError, ValueError) as error:
        raise InspectError(f"cannot read {path}: {_first_line(error)}") from None
    if not isinstance(labels, list) or not labels:
        raise InspectError(f"{path} must hold a non-empty JSON list of label names, got {type(labels).__name__}")
    return labels


def _load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception:  # noqa: BLE001 - any failure means no tokenizer: the report then shows token ids
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
