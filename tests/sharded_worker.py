"""The ranks of the sharded-training tests (tests/test_hf_sharded.py), started by torch.distributed.run.

``python -m torch.distributed.run --nproc_per_node 2 sharded_worker.py <engine> <result_file> <case> ...``

Each case trains a fresh accelerated model for STEPS Adam steps, each rank on its half of a 4-row batch
(equal token counts, so the averaged gradient is the gradient of one process on the whole batch), and
records per step the loss averaged over the ranks, the collectives issued and the project's ops that ran;
then the full prompt parameters and the adapter saved once (``softprompt_kernels.hf.save_adapter``). Rank 0
writes everything to ``result_file``. A case is ``method[+option...]``: ``+ckpt`` gradient checkpointing,
``+bf16`` bf16 mixed precision, ``+separate`` the batch-1 prompt pass forced (not the packed row).

Engines: ``fsdp2`` (``fully_shard`` on every decoder layer, then on the PeftModel, as a user applies it),
``trainer`` (HF ``Trainer`` with an Accelerate FSDP configuration), ``zero3`` (``Trainer`` with DeepSpeed ZeRO-3).
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import softprompt_kernels as sk  # noqa: E402
import softprompt_kernels.hf  # noqa: E402,F401
from hf_models import padded_batch  # noqa: E402
from softprompt_kernels.hf import save_adapter  # noqa: E402
from softprompt_kernels.profiling import count_collectives, kernel_calls  # noqa: E402
from test_hf_training import make, trainable  # noqa: E402

# the module, not the function softprompt_kernels.hf exports under the same name
accelerate_module = sys.modules["softprompt_kernels.hf.accelerate"]

STEPS = 3
LR = 1e-2


def batch():
    ids, _ = padded_batch(B=4, n=8, seed=3)
    return ids, torch.ones_like(ids)


def parse(case: str):
    method, *options = case.split("+")
    return method, set(options)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach().clone()


def run_fsdp2(case: str, out_dir: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    method, options = parse(case)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = sk.accelerate(make(method)).train()  # dropout is 0 in the tiny models; train() for checkpointing
    if "ckpt" in options:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if "bf16" in options \
        else MixedPrecisionPolicy()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.Adam(trainable(model), lr=LR)
    ids, mask = batch()
    rows = slice(rank * 2, rank * 2 + 2)
    if "separate" in options:
        accelerate_module.is_sharded = lambda model: False
    losses, collectives, kernels = [], [], []

    def step():
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=ids[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    try:
        for _ in range(STEPS):
            with count_collectives() as counts:
                loss, calls = kernel_calls(step)
            dist.all_reduce(loss)
            losses.append((loss / world).item())
            collectives.append(dict(counts))
            kernels.append(calls)
    finally:
        accelerate_module.is_sharded = sys.modules["softprompt_kernels.hf.sharding"].is_sharded
    params = [_full(p) for p in trainable(model)]
    adapter_dir = os.path.join(out_dir, case)
    save_adapter(model, adapter_dir)
    return {"losses": losses, "params": params, "collectives": collectives, "kernels": kernels,
            "adapter_dir": adapter_dir, "layers": len(model.get_base_model().model.layers)}


def trainer_arguments(engine: str, output_dir: str, bf16: bool = False, rows_per_process: int = 2):
    """Trainer's arguments for STEPS steps of plain Adam (AdamW without decay, constant rate, no clipping), 2 rows
    per rank, with the engine's configuration: Accelerate's FSDP (every decoder layer wrapped) or ZeRO-3."""
    from transformers import TrainingArguments

    common = dict(output_dir=output_dir, per_device_train_batch_size=rows_per_process, num_train_epochs=STEPS, learning_rate=LR,
                  lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
                  logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True,
                  bf16=bf16, seed=0, use_cpu=not torch.cuda.is_available())
    if engine == "one-process":
        return TrainingArguments(**common)
    if engine == "trainer":
        return TrainingArguments(**common, fsdp="full_shard auto_wrap",
                                 fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                              "use_orig_params": True})
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"}}
    return TrainingArguments(**common, deepspeed=zero3)


def allow_accelerate_fsdp_on_cpu():
    """Accelerate (1.15) takes an FSDP configuration only on accelerator devices: its AcceleratorState sets the
    FSDP distributed type for MULTI_GPU/NPU/XPU/... and never for MULTI_CPU, and Trainer then trains the model
    unsharded, with no warning. For the CPU test the state is made to take the plugin it was given (the only
    change: the rest, the wrapping, Trainer's FSDP handling, the collectives, is Accelerate's and Trainer's own);
    on GPUs it is not needed and not applied."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init


def run_trainer(engine: str, case: str, out_dir: str):
    from transformers import Trainer, TrainerCallback

    method, options = parse(case)
    model = sk.accelerate(make(method)).train()
    ids, mask = batch()
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i]} for i in range(len(ids))]
    kernels, collectives = [], []

    class Probe(TrainerCallback):  # per step: the collectives issued and the op's calls on this rank
        def on_step_begin(self, args, state, control, **kwargs):
            self.counter = count_collectives()
            self.counts = self.counter.__enter__()
            from torch.profiler import ProfilerActivity, profile
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.profiler.__exit__(None, None, None)
            self.counter.__exit__(None, None, None)
            collectives.append(dict(self.counts))
            calls = {}
            for event in self.profiler.events():
                if event.name.startswith("softprompt_kernels::"):
                    calls[event.name] = calls.get(event.name, 0) + 1
            kernels.append(calls)

    args = trainer_arguments(engine, os.path.join(out_dir, case + "-trainer"), bf16="bf16" in options)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Probe()])
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    with sk.hf.full_prompt_parameters(model):
        params = [_full(p) for p in trainable(model)]
    adapter_dir = os.path.join(out_dir, case)
    save_adapter(model, adapter_dir)
    return {"losses": losses, "params": params, "collectives": collectives, "kernels": kernels,
            "adapter_dir": adapter_dir, "layers": len(model.get_base_model().model.layers),
            "sharded": sk.hf.is_sharded(model.get_base_model())}


def main(engine: str, result_file: str, cases):
    if engine == "fsdp2":
        dist.init_process_group("gloo")
        run = run_fsdp2
    else:  # Trainer initialises the process group through Accelerate (gloo on a CPU, NCCL on GPUs)
        if engine == "trainer" and not torch.cuda.is_available():
            allow_accelerate_fsdp_on_cpu()
        run = (lambda case, out_dir: run_trainer(engine, case, out_dir))
    out_dir = os.path.dirname(result_file)
    results = {}
    for case in cases:
        result = run(case, out_dir)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result["kernels"])  # every rank's op calls: each must have run them
        result["kernels_per_rank"] = gathered
        results[case] = result
    if dist.get_rank() == 0:
        torch.save(results, result_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    sys.stdout.flush()
    # gloo's threads can abort during interpreter teardown on this torch build (tests/ddp_worker.py); the work
    # is done and saved, so leave without it.
    os._exit(0)
