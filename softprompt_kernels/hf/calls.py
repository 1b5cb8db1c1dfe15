"""What every accelerated forward and ``generate`` share: the state ``accelerate()`` leaves on the PEFT model, the
batch's shape and the output in the form asked for."""
from __future__ import annotations

from typing import Optional

STATE = "_softprompt_state"  # the instance attribute: {"attention", "family", "forward"} (or {"own_module"})


def state(peft_model) -> Optional[dict]:
    return getattr(peft_model, STATE, None)


def family(peft_model):
    """The family accelerate() found (checked once there, not on every forward)."""
    return state(peft_model)["family"]


def adapter_disabled(peft_model) -> bool:
    """Inside PEFT's ``with model.disable_adapter():`` PEFT swaps the model's forward for the base model's."""
    return peft_model.__dict__.get("forward") is not state(peft_model)["forward"]


def as_requested(out, return_dict, model):
    """The output as a ModelOutput or, with return_dict=False (or the config's use_return_dict off), a tuple."""
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def batch_and_length(input_ids, inputs_embeds):
    """(rows, text length, device) of the text given."""
    x = input_ids if input_ids is not None else inputs_embeds
    if x is None:
        raise ValueError("pass input_ids or inputs_embeds")
    return x.shape[0], x.shape[1], x.device
