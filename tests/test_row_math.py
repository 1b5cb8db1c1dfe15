"""The CPU kernel's softmax passes (csrc/cpu/row_math.h) on every instruction set this machine runs.

The kernel's max, exponential and sum passes are written on explicit GCC vectors (left to the auto-vectoriser
they had silently become scalar). GCC lowers those vectors differently per instruction set, and the kernel
picks one clone at load time, so the op's own tests only ever run the clone of the machine they run on. Here
tests/row_math_driver.cpp is compiled once per ``-march`` level the CPU supports (baseline x86-64 always;
x86-64-v3 with AVX2 and FMA; x86-64-v4 with AVX-512) and each pass's vector form is checked against its
scalar form on the same inputs: masked (-inf) scores, rows that see nothing, NaN scores, running maxima
from earlier chunks; the exponential against float64.
"""
import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux",
                                reason="the kernel's instruction-set clones exist on x86-64 Linux only")

ROOT = Path(__file__).resolve().parent.parent
I64, PTR, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def _cpu_flags():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _levels():
    flags = _cpu_flags()
    levels = ["x86-64"]
    if {"avx2", "fma", "bmi2"} <= flags:
        levels.append("x86-64-v3")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        levels.append("x86-64-v4")
    return levels


@pytest.fixture(scope="module", params=_levels())
def lib(request, tmp_path_factory):
    compiler = shutil.which("g++")
    assert compiler, "g++ is needed to build the extension, and here to compile tests/row_math_driver.cpp"
    out = tmp_path_factory.mktemp("row_math") / f"row_math_{request.param}.so"
    cmd = [compiler, "-std=c++17", "-O3", f"-march={request.param}", "-shared", "-fPIC", "-Wno-psabi",
           f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "row_math_driver.cpp"), "-o", str(out)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    lib.row_math_online_softmax.argtypes = [PTR, I64, I64, PTR, PTR, PTR, I64, INT]
    lib.row_math_softmax_grad.argtypes = [PTR, PTR, I64, I64, PTR, PTR, INT]
    lib.row_math_exp.argtypes = [PTR, PTR, I64, INT]
    assert lib.row_math_has_vectors() == 1, "row_math.h compiled without its vector passes"
    return lib


def _scores(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, width, generator=g) * 4
    s[torch.rand(rows, width, generator=g) < 0.3] = float("-inf")  # masked keys
    s[1] = float("-inf")  # a row that sees nothing in this chunk
    s[2, 5] = float("nan")  # a NaN score must reach the output, not vanish
    s[3, :] = -200.0  # far below the row's earlier maximum: exp underflows to 0
    return s


def _online(lib, s, m, l, o, vec):
    s, m, l, o = s.clone(), m.clone(), l.clone(), o.clone()
    lib.row_math_online_softmax(s.data_ptr(), s.shape[0], s.shape[1], m.data_ptr(), l.data_ptr(), o.data_ptr(),
                                o.shape[1], vec)
    return s, m, l, o


@pytest.mark.parametrize("width", [16, 112, 128])
def test_online_softmax_vector_pass_equals_scalar_pass(lib, width):
    rows, D = 8, 32
    s = _scores(rows, width, seed=width)
    # running state from earlier chunks: none yet (rows 0-2), a maximum above every score here (row 3), others
    m = torch.tensor([float("-inf")] * 3 + [5.0, 1.0, -1.0, 30.0, 0.5])
    l = torch.where(m == float("-inf"), 0.0, torch.rand(rows) + 0.5)
    o = torch.randn(rows, D)
    vector, scalar = _online(lib, s, m, l, o, 1), _online(lib, s, m, l, o, 0)
    for got, want in zip(vector, scalar):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30, equal_nan=True)
    s_out, m_out, l_out, _ = vector
    assert torch.isnan(l_out[2]) and torch.isnan(s_out[2, 5])
    assert m_out[1] == float("-inf") and l_out[1] == 0 and (s_out[1] == 0).all()
    assert (s_out[3] == 0).all()
    assert (s_out[torch.isinf(s)] == 0).all()


@pytest.mark.parametrize("width", [16, 128])
def test_softmax_grad_vector_pass_equals_scalar_pass(lib, width):
    rows = 8
    s = _scores(rows, width, seed=7 + width)
    dp = torch.randn(rows, width)
    lse = torch.randn(rows) + 3
    lse[1] = float("-inf")  # a query that saw no key: zeros
    delta = torch.randn(rows)
    results = []
    for vec in (1, 0):
        s_, dp_ = s.clone(), dp.clone()
        lib.row_math_softmax_grad(s_.data_ptr(), dp_.data_ptr(), rows, width, lse.data_ptr(), delta.data_ptr(), vec)
        results.append((s_, dp_))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30, equal_nan=True)
    assert (results[0][0][1] == 0).all() and (results[0][1][1] == 0).all()


def test_vector_exponential_against_float64(lib):
    x = torch.cat([torch.linspace(-86.0, 88.0, 40000), torch.tensor([0.0, -0.0, 1e-8, -87.0, -1e4, float("-inf"),
                                                                     float("nan"), 88.5])])
    x = torch.cat([x, x.new_zeros((-x.numel()) % 16)])
    outs = []
    for vec in (1, 0):
        y = torch.empty_like(x)
        lib.row_math_exp(x.data_ptr(), y.data_ptr(), x.numel(), vec)
        outs.append(y)
    vector, scalar = outs
    torch.testing.assert_close(vector, scalar, rtol=2e-7, atol=0, equal_nan=True)
    normal = (x > -86.0) & (x < 88.0)
    exact = torch.exp(x[normal].double())
    relative = ((vector[normal].double() - exact) / exact).abs()
    assert relative.max() < 1.1e-5, relative.max()
    assert relative[(x[normal] > -10) & (x[normal] < 10)].max() < 1e-6
    assert vector[x == 0].eq(1).all()
    assert vector[x <= -87.0].eq(0).all()
    assert torch.isnan(vector[torch.isnan(x)]).all()
