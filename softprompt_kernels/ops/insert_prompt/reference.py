"""The ``torch`` backend of ``insert_prompt``: what PEFT computes (the prompt expanded over the batch, concatenated
to the embedding lookup), differentiated by autograd. The reference of the fused kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import Backend, register_backend


def insert_prompt_reference(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    embeds = F.embedding(input_ids, weight)
    return torch.cat([prompt.to(weight.dtype).expand(input_ids.shape[0], -1, -1), embeds], dim=1)


class TorchInsertion(Backend):
    op = "insert_prompt"
    name = "torch"
    description = "pure PyTorch: expand + cat, what PEFT does (the reference)"

    def run(self, inputs):
        return insert_prompt_reference(inputs.input_ids, inputs.weight, inputs.prompt)


register_backend(TorchInsertion())
