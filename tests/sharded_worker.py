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


def main(engine: str, result_file: str, cases):
    dist.init_process_group("gloo")
    out_dir = os.path.dirname(result_file)
    run = {"fsdp2": run_fsdp2}[engine]
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
