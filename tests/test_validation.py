"""Bad inputs: one test per rejection, each asserting the message names the argument."""
import pytest
import torch

import softprompt_kernels as sk
from helpers import TENSOR_NAMES, forward_op_args
from softprompt_kernels import BackendNotSupportedError, InvalidArgumentError, InvalidDtypeError

B, HQ, HKV, LQ, LK, P, K, D = 2, 4, 2, 3, 5, 2, 3, 8


def args(**over):
    """Valid arguments with some replaced."""
    base = dict(q=torch.randn(B, HQ, LQ, D), k=torch.randn(B, HKV, LK, D), v=torch.randn(B, HKV, LK, D),
                prefix_k=torch.randn(P, HKV, K, D), prefix_v=torch.randn(P, HKV, K, D),
                prompt_ids=torch.tensor([0, 1]))
    base.update(over)
    return base


def call(backend="auto", **over):
    a = args(**over)
    return sk.prefix_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("prefix_k"), a.pop("prefix_v"),
                               backend=backend, **a)


def test_valid_arguments_pass():
    assert call().shape == (B, HQ, LQ, D)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("over, error, match", [
    (dict(q=[[1.0]]), InvalidDtypeError, r"^q must be a torch.Tensor"),
    (dict(q=torch.randn(B, HQ, LQ)), InvalidArgumentError, r"^q must have rank 4"),
    (dict(k=torch.randn(B, HKV, LK, D, 1)), InvalidArgumentError, r"^k must have rank 4"),
    (dict(v=torch.randn(HKV, LK, D)), InvalidArgumentError, r"^v must have rank 4"),
    (dict(prefix_k=torch.randn(HKV, K, D)), InvalidArgumentError, r"^prefix_k must have rank 4"),
    (dict(prefix_v=torch.randn(1, P, HKV, K, D)), InvalidArgumentError, r"^prefix_v must have rank 4"),
    (dict(q=torch.randint(0, 3, (B, HQ, LQ, D))), InvalidDtypeError, r"^q must be float16, bfloat16"),
    (dict(k=torch.randn(B, HKV, LK, D, dtype=torch.float64)), InvalidDtypeError, r"^k must have q's dtype"),
    (dict(v=torch.randn(B, HKV, LK, D).half()), InvalidDtypeError, r"^v must have q's dtype"),
    (dict(prefix_k=torch.randn(P, HKV, K, D).bfloat16()), InvalidDtypeError, r"^prefix_k must have q's dtype"),
    (dict(prefix_v=torch.randn(P, HKV, K, D).double()), InvalidDtypeError, r"^prefix_v must have q's dtype"),
    (dict(k=torch.randn(B, HKV, LK, D, device="meta")), InvalidArgumentError, r"^k must be on q's device"),
    (dict(prefix_v=torch.randn(P, HKV, K, D, device="meta")), InvalidArgumentError,
     r"^prefix_v must be on q's device"),
    (dict(k=torch.randn(B + 1, HKV, LK, D), v=torch.randn(B + 1, HKV, LK, D)), InvalidArgumentError,
     r"^k must have shape \[B=2"),
    (dict(k=torch.randn(B, HKV, LK, D + 1), v=torch.randn(B, HKV, LK, D + 1)), InvalidArgumentError,
     r"^k must have shape \[B=2, Hkv, Lk, D=8\]"),
    (dict(v=torch.randn(B, HKV, LK + 1, D)), InvalidArgumentError, r"^k and v must have the same shape .*v \("),
    (dict(k=torch.randn(B, HKV, LK + 1, D)), InvalidArgumentError, r"^k and v must have the same shape .*got k \("),
    (dict(k=torch.randn(B, 1, LK, D)), InvalidArgumentError, r"^k must have Hkv=2 heads like v and prefix_k"),
    (dict(v=torch.randn(B, 1, LK, D)), InvalidArgumentError, r"^v must have Hkv=2 heads like k and prefix_k"),
    (dict(k=torch.randn(B, HKV, LK, D + 1)), InvalidArgumentError, r"^k must have shape \[B=2, Hkv, Lk, D=8\]"),
    (dict(q=torch.randn(B, 3, LQ, D)), InvalidArgumentError, r"Hq=3 must be a multiple of .* Hkv=2"),
    (dict(q=torch.randn(B, HQ, LK + 1, D)), InvalidArgumentError, r"Lq=6 must not exceed k's length Lk=5"),
    (dict(q=torch.randn(B, HQ, LQ, 0), k=torch.randn(B, HKV, LK, 0), v=torch.randn(B, HKV, LK, 0),
          prefix_k=torch.randn(P, HKV, K, 0), prefix_v=torch.randn(P, HKV, K, 0)), InvalidArgumentError,
     r"^q must have a head dimension D >= 1"),
    (dict(prefix_k=torch.randn(P, HKV + 1, K, D), prefix_v=torch.randn(P, HKV + 1, K, D)), InvalidArgumentError,
     r"^prefix_k must have shape \[P, Hkv=2, K, D=8\]"),
    (dict(prefix_k=torch.randn(P, HKV, K, D + 2), prefix_v=torch.randn(P, HKV, K, D + 2)), InvalidArgumentError,
     r"^prefix_k must have shape"),
    (dict(prefix_v=torch.randn(P, HKV, K + 1, D)), InvalidArgumentError, r"^prefix_v must have prefix_k's shape"),
    (dict(prompt_ids=None), InvalidArgumentError, r"prompt_ids=None .* exactly one prompt \(P=1\); got P=2"),
    (dict(prompt_ids=torch.tensor([0.0, 1.0])), InvalidDtypeError, r"^prompt_ids must be an int32 or int64"),
    (dict(prompt_ids=torch.tensor([0, 1, 1])), InvalidArgumentError, r"^prompt_ids must have shape \[B=2\]"),
    (dict(prompt_ids=torch.tensor([[0, 1]])), InvalidArgumentError, r"^prompt_ids must have rank 1"),
    (dict(prompt_ids=torch.tensor([0, 2])), InvalidArgumentError, r"^prompt_ids must lie in \[-1, P=2\)"),
    (dict(prompt_ids=torch.tensor([-2, 0])), InvalidArgumentError, r"^prompt_ids must lie in \[-1, P=2\)"),
    (dict(prompt_ids=torch.tensor([0, 1], device="meta")), InvalidArgumentError,
     r"^prompt_ids must be on q's device"),
    (dict(prefix_lens=torch.tensor([1.0, 2.0])), InvalidDtypeError, r"^prefix_lens must be an int32 or int64"),
    (dict(prefix_lens=torch.tensor([1, 2, 3])), InvalidArgumentError, r"^prefix_lens must have shape \[P=2\]"),
    (dict(prefix_lens=torch.tensor([1, K + 1])), InvalidArgumentError, r"^prefix_lens must lie in \[0, K=3\]"),
    (dict(prefix_lens=torch.tensor([-1, 2])), InvalidArgumentError, r"^prefix_lens must lie in \[0, K=3\]"),
    (dict(key_padding_mask=torch.ones(B, LK, dtype=torch.long)), InvalidDtypeError,
     r"^key_padding_mask must be a bool tensor"),
    (dict(key_padding_mask=torch.ones(B, LQ, dtype=torch.bool)), InvalidArgumentError,
     r"^key_padding_mask must have shape \[B=2, Lk=5\]"),
    (dict(key_padding_mask=torch.ones(B, 1, 1, LK, dtype=torch.bool)), InvalidArgumentError,
     r"^key_padding_mask must have rank 2"),
    (dict(key_padding_mask=torch.ones(B, LK, dtype=torch.bool, device="meta")), InvalidArgumentError,
     r"^key_padding_mask must be on q's device"),
    (dict(scale=float("nan")), InvalidArgumentError, r"^scale must be finite"),
    (dict(scale="0.1"), InvalidDtypeError, r"^scale must be a real number"),
    (dict(causal=1), InvalidDtypeError, r"^causal must be a bool"),
])
def test_rejection(backend, over, error, match):
    with pytest.raises(error, match=match):
        call(backend=backend, **over)


def test_return_lse_must_be_bool():
    with pytest.raises(TypeError, match="return_lse"):
        call(return_lse="yes")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(InvalidArgumentError, match=r"backend must be 'auto' or one of \['torch', 'cpu', 'cuda', 'triton'\]"):
        call(backend="flash")


def test_cpu_backend_refuses_other_devices_with_its_reason():
    meta = dict(q=torch.randn(B, HQ, LQ, D, device="meta"), k=torch.randn(B, HKV, LK, D, device="meta"),
                v=torch.randn(B, HKV, LK, D, device="meta"), prefix_k=torch.randn(P, HKV, K, D, device="meta"),
                prefix_v=torch.randn(P, HKV, K, D, device="meta"), prompt_ids=torch.tensor([0, 1], device="meta"))
    with pytest.raises(BackendNotSupportedError, match=r"backend='cpu' cannot run .*needs cpu tensors, got meta"):
        call(backend="cpu", **meta)


def test_errors_are_value_errors_and_dtype_errors_also_type_errors():
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InvalidDtypeError, TypeError) and issubclass(InvalidDtypeError, ValueError)


# The C++ op checks again, so a direct call of torch.ops never crashes or reads out of bounds.
OP = torch.ops.softprompt_kernels.prefix_attention_fwd


def op_args(**over):
    a = args(**over)
    return forward_op_args([a[name] for name in TENSOR_NAMES], prompt_ids=a["prompt_ids"],
                           prefix_lens=over.get("prefix_lens"), key_padding_mask=over.get("key_padding_mask"))


@pytest.mark.parametrize("over, match", [
    (dict(prompt_ids=torch.tensor([0, 5])), r"prompt_ids must lie in \[-1, P=2\)"),
    (dict(prefix_lens=torch.tensor([0, 9])), r"prefix_lens must lie in \[0, K=3\]"),
    (dict(q=torch.randn(B, 3, LQ, D)), r"q heads \(3\) must be a multiple of k heads \(2\)"),
    (dict(q=torch.randn(B, HQ, LK + 1, D)), r"q length \(6\) must not exceed k length \(5\)"),
    (dict(key_padding_mask=torch.ones(B, LQ, dtype=torch.bool)), r"key_padding_mask must have shape"),
    (dict(prompt_ids=torch.tensor([0])), r"prompt_ids must have shape \[B=2\]"),
    (dict(v=torch.randn(B, HKV, LK, D + 1)), r"v must have shape \[B="),
])
def test_direct_op_call_rejects(over, match):
    with pytest.raises(ValueError, match=match):
        OP(*op_args(**over))


def test_direct_op_call_rejects_dtype_mismatch():
    with pytest.raises(TypeError, match=r"k must have q's dtype"):
        OP(*op_args(k=torch.randn(B, HKV, LK, D).double()))
