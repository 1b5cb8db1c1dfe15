"""Issue 13's acceptance matrix in one place: multitask prompt tuning, Cartridges, CPT and adaption prompts on
llama, qwen3 and mistral (adaption prompts on the families PEFT has a recipe for: llama and mistral; qwen3 is
refused with the reason, tested in test_hf_adaption_prompt.py), each against PEFT: loss, text logits and every
trainable gradient (rel 1e-4, left padding), greedy generate equal to a greedy loop over PEFT's forward, and the
project's ops counted by the profiler (so an accelerate() that changed nothing could not pass). Right padding,
save/load, checkpointing and the method-specific checks live in each method's own test file."""
import pytest
import torch

pytest.importorskip("peft")

import softprompt_kernels as sk  # noqa: E402
from hf_models import padded_batch  # noqa: E402
from softprompt_kernels.profiling import kernel_calls  # noqa: E402
from test_hf_adaption_prompt import adaption_model  # noqa: E402
from test_hf_cartridge import cartridge_model  # noqa: E402
from test_hf_cpt import batch as cpt_batch  # noqa: E402
from test_hf_cpt import cpt_model  # noqa: E402
from test_hf_multitask import multitask_model  # noqa: E402
from test_hf_peft_parity import greedy_loop, relative  # noqa: E402

FAMILIES = ["llama", "qwen3", "mistral"]
CASES = [(method, family) for method in ("multitask", "cartridge", "cpt", "adaption") for family in FAMILIES
         if not (method == "adaption" and family == "qwen3")]


class Method:
    """One PEFT model and how to call it: the extra inputs its forward takes (task ids, CPT's type mask)."""

    def __init__(self, method, family):
        ids, mask = padded_batch(B=3, n=9, left=True)
        self.extra = {}
        if method == "multitask":
            self.model = multitask_model(family)
            self.extra = {"task_ids": torch.tensor([2, 0, 1])}
        elif method == "cartridge":
            self.model = cartridge_model(family)
        elif method == "cpt":
            self.model = cpt_model(family)
            ids, mask, types = cpt_batch(left=True)
            self.extra = {"input_type_mask": types}
        else:
            self.model = adaption_model(family)
        self.ids, self.mask = ids, mask

    def __call__(self, **kwargs):
        extra = {k: v.clone() for k, v in self.extra.items()}  # CPT edits its type mask in place
        return self.model(**kwargs, **extra)

    def parameters(self):
        return self.model.parameters()

    def loss_logits_grads(self):
        labels = self.ids.masked_fill(self.mask == 0, -100)
        out = self(input_ids=self.ids, attention_mask=self.mask, labels=labels)
        params = [p for _, p in sorted(self.model.named_parameters()) if p.requires_grad]
        return out.loss.detach(), out.logits[:, -self.ids.shape[1]:].detach(), torch.autograd.grad(out.loss, params)

    def generate(self, steps):
        extra = {k: v for k, v in self.extra.items() if k == "task_ids"}
        return self.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=steps,
                                   do_sample=False, pad_token_id=0, **extra)[:, -steps:]


@pytest.mark.parametrize("method,family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_parity_generate_and_the_ops_ran(method, family):
    case = Method(method, family)
    expected = case.loss_logits_grads()
    steps = 5
    loop = greedy_loop(lambda input_ids, attention_mask: case(input_ids=input_ids, attention_mask=attention_mask),
                       case.ids, case.mask, steps) if method != "cpt" else greedy_loop(case.model, case.ids,
                                                                                       case.mask, steps)
    sk.accelerate(case.model)
    got, calls = kernel_calls(case.loss_logits_grads)
    assert any("prefix_attention" in name or "insert" in name for name in calls), calls
    assert any("bwd" in name or "backward" in name for name in calls), calls  # the gradients came from our ops
    (loss2, logits2, grads2), (loss, logits, grads) = got, expected
    real = case.mask.bool()
    assert abs(loss2 - loss).item() <= 1e-4 * abs(loss).item()
    assert relative(logits2[real], logits[real]) <= 1e-4
    assert len(grads2) == len(grads) > 0
    for g2, g in zip(grads2, grads):
        assert g.abs().sum() > 0 and relative(g2, g) <= 1e-4
    assert torch.equal(case.generate(steps), loop)
    sk.restore(case.model)
