"""Seeded random draws (hypothesis) of shapes, prompts, lengths and padding against the oracle."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import Case, assert_matches_oracle, backend_results, oracle_results


@st.composite
def cases(draw):
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 3))
    Lk = draw(st.integers(1, 12))
    Lq = draw(st.integers(1, Lk))
    B = draw(st.integers(1, 4))
    P = draw(st.integers(0, 3))
    K = draw(st.integers(0, 6))
    D = draw(st.sampled_from([1, 3, 8, 12, 16]))
    causal = draw(st.booleans())
    ids = None
    if P != 1 or draw(st.booleans()):
        ids = [draw(st.integers(-1, P - 1)) for _ in range(B)]
    lens = [draw(st.integers(0, K)) for _ in range(P)] if P > 0 and draw(st.booleans()) else None
    padding = None
    if draw(st.booleans()):
        padding = [[draw(st.integers(0, 4)) > 0 for _ in range(Lk)] for _ in range(B)]
    return Case(B, Hq, Hkv, Lq, Lk, P, K, D, causal, ids, lens, padding, seed=draw(st.integers(0, 1000)))


# triton runs in its interpreter on CPU tensors (conftest): slow, so make test-quick leaves it out
@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.slow)])
@given(case=cases())
def test_random_cases_match_oracle(backend, case):
    assert_matches_oracle(backend_results(case, backend, torch.float32), oracle_results(case), rtol=1e-5)
