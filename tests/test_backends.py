"""Backend discovery and choice: available_backends, not_supported_reasons, auto never silently slow."""
import warnings

import pytest
import torch

import softprompt_kernels as sk
from softprompt_kernels.ops import extension
from helpers import Case, make_inputs


def test_this_install_has_the_cpu_extension():
    # CI builds the extension: its absence is a failure, not a skip.
    assert extension.extension_loaded(), extension.EXTENSION_ERROR
    assert {"torch", "cpu"} <= set(sk.available_backends())
    assert sk.backend_status()["cpu"] is None


def test_auto_picks_the_fused_cpu_kernel_on_cpu():
    tensors, kwargs = make_inputs(Case(2, 2, 2, 3, 3, 1, 2, 4))
    assert sk.resolve_backend(*tensors, **kwargs) == "cpu"
    assert sk.resolve_backend(*tensors, backend="torch", **kwargs) == "torch"


def test_not_supported_reasons_lists_why():
    meta = [torch.empty(2, 2, 3, 4, device="meta"), torch.empty(2, 2, 3, 4, device="meta"),
            torch.empty(2, 2, 3, 4, device="meta"), torch.empty(1, 2, 2, 4, device="meta"),
            torch.empty(1, 2, 2, 4, device="meta")]
    assert sk.not_supported_reasons("cpu", *meta) == ["the cpu backend needs cpu tensors, got meta"]
    assert sk.not_supported_reasons("torch", *meta) == []


def test_auto_warns_when_it_falls_back_to_the_torch_path(monkeypatch):
    monkeypatch.setattr(extension, "EXTENSION_ERROR", "pretend the extension failed to load")
    monkeypatch.setattr("softprompt_kernels.common._warned", set())
    tensors, kwargs = make_inputs(Case(2, 2, 2, 3, 3, 1, 2, 4), requires_grad=False)
    with pytest.warns(sk.PerformanceWarning, match="falls back to the pure-PyTorch path .*pretend the extension"):
        out = sk.prefix_attention(*tensors, **kwargs)
    torch.testing.assert_close(out, sk.prefix_attention(*tensors, **kwargs, backend="torch"))
    assert "cpu" not in sk.available_backends()
    with warnings.catch_warnings():  # once per reason, not per call
        warnings.simplefilter("error")
        sk.prefix_attention(*tensors, **kwargs)


def test_explicit_cpu_backend_without_extension_raises(monkeypatch):
    monkeypatch.setattr(extension, "EXTENSION_ERROR", "pretend the extension failed to load")
    tensors, kwargs = make_inputs(Case(2, 2, 2, 3, 3, 1, 2, 4), requires_grad=False)
    with pytest.raises(sk.BackendNotSupportedError, match="pretend the extension failed to load"):
        sk.prefix_attention(*tensors, **kwargs, backend="cpu")


def test_priority_table_names_registered_backends_of_each_op():
    from softprompt_kernels.ops import backends

    for op, by_device in backends.PRIORITY.items():
        for device_type, names in by_device.items():
            assert names[-1] == backends.FALLBACK, (op, device_type)
            assert set(names) <= set(backends.backend_names(op)), (op, device_type)
        assert set(backends.backend_names(op)) <= {n for names in by_device.values() for n in names} | {"triton"}


def test_auto_follows_the_priority_table_not_the_import_order(monkeypatch):
    from softprompt_kernels.ops import backends

    tensors, kwargs = make_inputs(Case(2, 2, 2, 3, 3, 1, 2, 4), requires_grad=False)
    monkeypatch.setitem(backends.PRIORITY["prefix_attention"], "cpu", ("torch", "cpu"))
    assert sk.resolve_backend(*tensors, **kwargs) == "torch"


def test_unknown_backend_and_op_are_named():
    tensors, kwargs = make_inputs(Case(2, 2, 2, 3, 3, 1, 2, 4), requires_grad=False)
    with pytest.raises(sk.InvalidArgumentError, match="backend must be 'auto' or one of"):
        sk.prefix_attention(*tensors, **kwargs, backend="nope")
    with pytest.raises(sk.InvalidArgumentError, match="op must be one of"):
        sk.available_backends("nope")


def test_each_op_lists_its_own_backends():
    assert {"torch", "cpu"} <= set(sk.available_backends("insert_prompt"))
    assert "triton" not in sk.backend_status("insert_prompt")
