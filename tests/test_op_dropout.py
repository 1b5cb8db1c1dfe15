"""Attention dropout (training) goes through the registry: the fused backends refuse it by name, ``auto`` takes the
torch backend with a PerformanceWarning, and the call is validated like any other (range checks included), also
when it comes from a Hugging Face model in training mode."""
import warnings

import pytest
import torch

import softprompt_kernels as sk
from helpers import Case, make_inputs

CASE = Case(2, 4, 2, 3, 5, 2, 3, 8, prompt_ids=[1, -1], prefix_lens=[2, 3])


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr("softprompt_kernels.common._warned", set())


def test_auto_runs_dropout_on_the_torch_backend_and_says_why():
    tensors, kwargs = make_inputs(CASE)
    with pytest.warns(sk.PerformanceWarning, match="no attention dropout"):
        torch.manual_seed(3)
        out = sk.prefix_attention(*tensors, **kwargs, dropout_p=0.4)
    torch.manual_seed(3)
    expected = sk.prefix_attention(*tensors, **kwargs, dropout_p=0.4, backend="torch")
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, sk.prefix_attention(*tensors, **kwargs))  # the probabilities were dropped
    out.sum().backward()
    assert all(t.grad is not None for t in tensors)


def test_a_fused_backend_refuses_dropout_naming_it():
    tensors, kwargs = make_inputs(CASE, requires_grad=False)
    reasons = sk.not_supported_reasons("cpu", *tensors, **kwargs, dropout_p=0.1)
    assert any("no attention dropout (dropout_p=0.1" in r for r in reasons), reasons
    with pytest.raises(sk.BackendNotSupportedError, match="dropout"):
        sk.prefix_attention(*tensors, **kwargs, dropout_p=0.1, backend="cpu")
    assert sk.not_supported_reasons("cpu", *tensors, **kwargs, dropout_p=0.0) == []


@pytest.mark.parametrize("value, error", [(1.0, sk.InvalidArgumentError), (-0.1, sk.InvalidArgumentError),
                                          ("0.1", sk.InvalidDtypeError), (True, sk.InvalidDtypeError)])
def test_bad_dropout_values_name_the_argument(value, error):
    tensors, kwargs = make_inputs(CASE, requires_grad=False)
    with pytest.raises(error, match="^dropout_p must"):
        sk.prefix_attention(*tensors, **kwargs, dropout_p=value)


def test_the_dropout_path_checks_index_values():
    tensors, kwargs = make_inputs(CASE, requires_grad=False)
    kwargs["prompt_ids"] = torch.tensor([0, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sk.PerformanceWarning)
        with pytest.raises(sk.InvalidArgumentError, match=r"prompt_ids must lie in \[-1, P=2\)"):
            sk.prefix_attention(*tensors, **kwargs, dropout_p=0.2)


def test_a_training_model_with_attention_dropout_runs_through_the_registry():
    transformers = pytest.importorskip("transformers")
    from softprompt_kernels.hf import use_softprompt_attention

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
    model = transformers.LlamaForCausalLM(config).train()
    use_softprompt_attention(model)
    ids = torch.randint(0, 50, (2, 6))
    with pytest.warns(sk.PerformanceWarning, match="no attention dropout"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    model.eval()  # no dropout in eval mode: the fused path, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", sk.PerformanceWarning)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
