"""One rank of the DDP test (tests/test_hf_training.py), started by torch.distributed.run.

Each of the two ranks trains on half of a 4-row batch with equal token counts, so DDP's averaged
gradient equals the gradient of one process on the whole batch; rank 0 saves it.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch  # noqa: E402
from test_hf_training import make, trainable  # noqa: E402


def main(method: str, result_file: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = sk.accelerate(make(method))
    ids, _ = padded_batch(B=4, n=8, seed=3)
    mask = torch.ones_like(ids)
    rows = slice(rank * 2, rank * 2 + 2)
    ddp = DistributedDataParallel(model)  # kept alive through backward: its reducer does the all-reduce
    loss = ddp(input_ids=ids[rows], attention_mask=mask[rows], labels=ids[rows]).loss
    loss.backward()
    if rank == 0:
        torch.save([p.grad for p in trainable(model)], result_file)
    dist.barrier()
    dist.destroy_process_group()
    # Leave while `ddp` is still alive: freeing its Reducer destroys the gloo process group, whose worker thread
    # can wait for the GIL the freeing thread holds (a teardown deadlock seen here, intermittently).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    # gloo's threads can abort ("terminate called without an active exception") during interpreter
    # teardown on this torch build; the work is done and saved, so leave without it.
    os._exit(0)
