"""Sharded training-step benchmark: PEFT vs the accelerated model under the same FSDP2 sharding.

Each case starts ``world`` processes through ``torch.distributed.run`` (gloo on a CPU, NCCL on GPUs); every rank
builds the same frozen model (the ``peft-cpu`` shapes, bench/peft_training.py), applies ``fully_shard`` to
every decoder layer and then to the PeftModel, and times one training step (forward with labels, backward,
Adam step) of each provider in interleaved rounds on its own ``B`` rows:

- ``peft``: Hugging Face PEFT as users run it;
- ``accelerated``: the same PEFT model after ``softprompt_kernels.accelerate`` (on a sharded model the prompt
  goes through packed with the text as row 0 of the batch: one gather of each layer's weights);
- ``accelerated_separate``: the accelerated model with the prompt in its own batch-1 pass (prompt methods
  only): what packing saves in gathers and time.

A record's ``ms`` is the median step time of the slowest rank, ``peak_mem_mb`` the largest per-rank peak of
one step (above what was allocated before it); its config carries each rank's numbers and the collectives
of one step (all-gathers, reduce-scatters).
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch

from .harness import Record, Suite, Timing, device_name, free_port, git_commit, kill_process_tree
from .peft_training import Case as ModelCase
from .peft_training import case_model, case_peft_config

BENCH = "sharded_training_step"
CASE_KEY = ("model (h = hidden, L = layers), method, B = rows per rank, n = text tokens, k = virtual tokens, "
            "ranks; one training step (forward + backward + Adam) under FSDP2")
PROVIDERS = ("peft", "accelerated", "accelerated_separate")


@dataclass(frozen=True)
class Case:
    model: ModelCase  # the model, method and per-rank batch (B rows of n tokens each rank)
    world: int = 2

    @property
    def name(self) -> str:
        return f"{self.model.name} x{self.world} ranks FSDP2"

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "world": self.world, **{k: v for k, v in asdict(self.model).items()}}


def known_providers() -> List[str]:
    return list(PROVIDERS)


def measure(case: Case, device, providers: Optional[Sequence[str]] = None, timing: Optional[Timing] = None
            ) -> List[Record]:
    """Runs the case's ranks (bounded: torchrun and every rank are killed past a deadline) and returns one record
    per provider."""
    device = torch.device(device)
    timing = timing or Timing()
    wanted = [p for p in PROVIDERS if providers is None or p in providers]
    if case.model.method == "prefix":
        wanted = [p for p in wanted if p != "accelerated_separate"]  # prefix tuning has no prompt pass
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        spec = {"case": asdict(case.model), "providers": wanted, "timing": asdict(timing), "device": device.type}
        threads = max(1, (os.cpu_count() or 1) // case.world) if device.type == "cpu" else 1
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(case.world),
                   "--master_port", str(free_port()), "-m", __name__, "--worker", json.dumps(spec), result_file]
        deadline = 120 + 3 * timing.min_time_s * len(wanted)
        process = subprocess.Popen(command, env=env)
        try:
            process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            kill_process_tree(process.pid)  # torchrun and its ranks (each in a session of its own)
            process.wait()
            raise RuntimeError(f"{case.name}: the ranks ran past {deadline:.0f} s and were killed")
        if process.returncode != 0:
            raise RuntimeError(f"{case.name}: the ranks failed (exit status {process.returncode})")
        with open(result_file) as f:
            per_rank = json.load(f)
    records = []
    for provider in wanted:
        ranks = [r[provider] for r in per_rank]
        config = {**case.config(), "threads_per_rank": threads,
                  "ms_per_rank": [r["ms"] for r in ranks], "peak_mem_mb_per_rank": [r["peak_mem_mb"] for r in ranks],
                  "collectives_per_step": ranks[0]["collectives"], "loss": ranks[0]["loss"]}
        records.append(Record(bench=BENCH, provider=provider, device=device_name(device), commit=git_commit(),
                              config=config, ms=max(r["ms"] for r in ranks), tflops=0.0, gbps=0.0,
                              peak_mem_mb=max(r["peak_mem_mb"] for r in ranks)))
    return records


def goals(records: Sequence[Record]) -> List[str]:
    """Prompt tuning under FSDP2: accelerated >= 1.5x faster than PEFT per step, with lower peak memory per rank."""
    by: Dict[str, Dict[str, Record]] = {}
    for r in records:
        by.setdefault(r.config["name"], {})[r.provider] = r
    lines = []
    for name, recs in by.items():
        if not {"peft", "accelerated"} <= set(recs):
            continue
        speedup = recs["peft"].ms / recs["accelerated"].ms
        line = f"{name}: {speedup:.2f}x faster than PEFT"
        if recs["accelerated"].config["method"] == "prompt":
            line += f" (goal >= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'})"
        peft_mem, ours = recs["peft"].peak_mem_mb, recs["accelerated"].peak_mem_mb
        if peft_mem is not None and ours is not None:
            line += f"; peak MiB per rank {peft_mem:.0f} (PEFT) vs {ours:.0f} ({'lower' if ours < peft_mem else 'NOT lower'})"
        gathers = {p: recs[p].config["collectives_per_step"]["all_gather"] for p in recs}
        line += "; all-gathers per step " + ", ".join(f"{p} {n}" for p, n in gathers.items())
        lines.append(line)
    return lines


# --- one rank (python -m torch.distributed.run -m softprompt_kernels.bench.sharded_training --worker SPEC FILE)


def _worker(spec: Dict[str, Any], result_file: str) -> None:
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard

    import softprompt_kernels as sk
    import softprompt_kernels.hf  # noqa: F401  (its accelerate module is patched by the separate provider)
    from ..profiling import count_collectives, peak_memory_mb

    case, timing = ModelCase(**spec["case"]), Timing(**spec["timing"])
    on_gpu = spec["device"] == "cuda"
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own rows
    ids = torch.randint(1, case.vocab, (case.B, case.n), generator=gen).to(device)
    mask = torch.ones_like(ids)
    base = case_model(case, device)  # the same weights on every rank (seeded)
    for p in base.parameters():
        p.requires_grad_(False)
    steps = {}
    for provider in spec["providers"]:
        model = get_peft_model(copy.deepcopy(base), case_peft_config(case))
        if provider.startswith("accelerated"):
            sk.accelerate(model)
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        steps[provider] = _training_step(model, ids, mask, separate=provider == "accelerated_separate")
    del base
    results = {}
    for provider, step in steps.items():
        for _ in range(timing.warmup):
            step()
        with count_collectives() as counts:
            loss = step()
        results[provider] = {"collectives": dict(counts), "loss": loss,
                             "peak_mem_mb": peak_memory_mb(step, device)}
    times: Dict[str, List[float]] = {p: [] for p in steps}
    start = time.perf_counter()
    rounds = 0
    while rounds < timing.reps or time.perf_counter() - start < timing.min_time_s:
        # the same order on every rank (the steps' collectives pair up); the order rotates between rounds
        names = list(steps)[rounds % len(steps):] + list(steps)[:rounds % len(steps)]
        for provider in names:
            dist.barrier()
            t0 = time.perf_counter()
            steps[provider]()
            if on_gpu:
                torch.cuda.synchronize()
            times[provider].append(time.perf_counter() - t0)
        rounds += 1
        stop = torch.tensor([time.perf_counter() - start >= timing.min_time_s and rounds >= timing.reps])
        dist.broadcast(stop, 0)  # every rank stops after the same round
        if bool(stop):
            break
    for provider in steps:
        results[provider]["ms"] = 1e3 * statistics.median(times[provider])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def _training_step(model, ids, mask, separate: bool):
    accelerate_module = sys.modules["softprompt_kernels.hf.accelerate"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        sharded = accelerate_module.is_sharded
        if separate:  # the batch-1 prompt pass, as on one device
            accelerate_module.is_sharded = lambda model: False
        try:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        finally:
            accelerate_module.is_sharded = sharded
        return loss.item()
    return step


_ACCEPTANCE = ModelCase("prompt", B=16, n=128, k=100)  # peft-cpu's model and batch, on every rank

SUITES: Dict[str, Suite] = {
    # 20 s of interleaved rounds per case (as peft-cpu: the machine is shared and noisy)
    "fsdp-cpu": Suite("fsdp-cpu", "cpu", [Case(_ACCEPTANCE), Case(replace(_ACCEPTANCE, B=8)),
                                          Case(replace(_ACCEPTANCE, method="prefix"))],
                      Timing(reps=10, warmup=2, min_time_s=20.0)),
    "fsdp-cpu-quick": Suite("fsdp-cpu-quick", "cpu", [Case(ModelCase("prompt", B=2, n=16, k=8, hidden=64, layers=2,
                                                                      heads=4, kv_heads=2, vocab=100,
                                                                      intermediate=96))],
                            Timing(reps=3, warmup=1, min_time_s=0.05)),
    # the 1B-parameter bf16 model of peft-gpu, sharded over the lent machine's GPUs (one: world 1)
    "fsdp-gpu": Suite("fsdp-gpu", "cuda", [Case(ModelCase("prompt", B=32, n=256, k=100, hidden=2048, layers=16,
                                                          heads=32, kv_heads=8, vocab=32000, intermediate=5632,
                                                          dtype="bfloat16"),
                                                world=max(1, torch.cuda.device_count()))],
                      Timing(reps=10, warmup=2, min_time_s=5.0)),
}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]), sys.argv[3])
        sys.stdout.flush()
        os._exit(0)  # gloo's threads can abort at interpreter teardown; the results are written
    raise SystemExit("run the suites with: softprompt-kernels bench --suite fsdp-cpu")
