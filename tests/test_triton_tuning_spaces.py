"""The Triton tuning tables: every input the backend accepts has a verified config in every kernel.

(Whether each config compiles without spills is `python -m softprompt_kernels.triton.compile_check`,
run by CI; these tests check the tables' coverage and the pruning logic without compiling.)
"""
import itertools

import pytest

triton = pytest.importorskip("triton")

from softprompt_kernels.triton import common  # noqa: E402
from softprompt_kernels.triton.backward import BWD_SPACE, DQ_SPACE, PREFIX_SPACE  # noqa: E402
from softprompt_kernels.triton.forward import FWD_SPACE  # noqa: E402

SPACES = {"fwd": FWD_SPACE, "bwd_kv": BWD_SPACE, "bwd_prefix": PREFIX_SPACE, "bwd_dq": DQ_SPACE}


def _allowed(space, block_d, family, dtype, flags):
    return [c for c in space.get(block_d, [])
            if family in c.get("archs", common.ALL_ARCHS) and dtype in c.get("dtypes", common.HALF_DTYPES)
            and all(flags.get(k, v) == v for k, v in c.get("when", {}).items())]


@pytest.mark.parametrize("kernel", SPACES)
def test_every_accepted_input_has_a_config(kernel):
    heavy = dict(HAS_PADDING=True, HAS_IDS=True, HAS_LENS=True, DETERMINISTIC=False, CAUSAL=True, HAS_WINDOW=True,
                 HAS_SOFTCAP=True)
    for block_d, family, dtype, even_d in itertools.product((16, 32, 64, 128, 256), (80, 90),
                                                            ("bf16", "fp16", "fp32"), (True, False)):
        if dtype == "fp32" and block_d not in common.FP32_HEAD_BLOCKS:
            continue  # refused by the backend
        flags = dict(heavy, EVEN_D=even_d)
        assert _allowed(SPACES[kernel], block_d, family, dtype, flags), (kernel, block_d, family, dtype, even_d)


def test_conditional_configs_are_offered_only_without_padding_or_without_features():
    conditional = [c for space in SPACES.values() for cs in space.values() for c in cs if "when" in c]
    assert conditional, "the plain-case tiles exist"
    for c in conditional:
        plain = c["when"].get("HAS_PADDING") is False and c["when"].get("EVEN_D") is True
        no_features = c["when"].get("HAS_WINDOW") is False and c["when"].get("HAS_SOFTCAP") is False
        assert plain or no_features, c


def test_prune_keeps_only_the_configs_for_the_call():
    import torch

    space = {128: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
                   dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, archs=(90,), when={"HAS_PADDING": False}),
                   dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, dtypes=("fp32",))]}
    configs = [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in space[128]]
    prune = common.prune_by_head_block(space)
    q = torch.empty(1, dtype=torch.bfloat16)
    padded = prune(configs, {"Q": q}, BLOCK_D=128, HAS_PADDING=True)
    plain = prune(configs, {"Q": q}, BLOCK_D=128, HAS_PADDING=False)
    fp32 = prune(configs, {"Q": q.float()}, BLOCK_D=128, HAS_PADDING=True)
    assert [c.kwargs["BLOCK_M"] for c in padded] == [64]
    assert [c.kwargs["BLOCK_M"] for c in plain] == [64, 128]
    assert [c.kwargs["BLOCK_M"] for c in fp32] == [32]
    with pytest.raises(RuntimeError, match="no verified Triton config"):
        prune(configs, {"Q": q}, BLOCK_D=256)
