"""softprompt attention inside Hugging Face models: the same numbers as their SDPA path."""
import pytest
import torch

pytest.importorskip("transformers")

from hf_models import DECODERS, ENCODERS, padded_batch, tiny_model  # noqa: E402
from softprompt_kernels.hf.attention import use_softprompt_attention  # noqa: E402
from softprompt_kernels.hf.families import UnsupportedModelError, family_of  # noqa: E402


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("model_type", DECODERS + ENCODERS)
def test_no_prefix_matches_sdpa(model_type, left):
    head = "causal_lm" if model_type in DECODERS else "base"
    model = tiny_model(model_type, head)
    ids, mask = padded_batch(left=left)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
        expected = expected.logits if head == "causal_lm" else expected.last_hidden_state
        previous = use_softprompt_attention(model)
        actual = model(input_ids=ids, attention_mask=mask)
        actual = actual.logits if head == "causal_lm" else actual.last_hidden_state
        model.set_attn_implementation(previous)
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)


def test_unsupported_family_is_named_with_its_reason():
    from transformers import FalconConfig

    with pytest.raises(UnsupportedModelError, match=r"'falcon' cannot be accelerated: it uses ALiBi"):
        family_of(FalconConfig(alibi=True))


def test_a_window_only_in_the_mask_function_reaches_the_op():
    """PhiMoE-style: the sliding window is in the mask the model builds, not in its attention's arguments."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    from softprompt_kernels.hf.attention import WINDOW_ATTRIBUTE, softprompt_mask

    mask = softprompt_mask(2, 3, 5, mask_function=sliding_window_causal_mask_function(7), attention_mask=None)
    assert mask.shape == (2, 5) and bool(mask.all()) and getattr(mask, WINDOW_ATTRIBUTE) == 7
    assert softprompt_mask(2, 3, 5, mask_function=causal_mask_function, attention_mask=None) is None
