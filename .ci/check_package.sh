#!/usr/bin/env bash
# The package as a user gets it: build the wheel and the sdist from this checkout, install each into a fresh
# virtual environment and use it from outside the checkout (every submodule imports, the op runs on the
# CPU, `softprompt-kernels bench` runs a tiny suite). Needs the project's .venv (make test builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py="$root/.venv/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export MAX_JOBS=${MAX_JOBS:-2}

echo "==> building the wheel and the sdist"
"$py" -m pip wheel --no-build-isolation --no-deps -q -w "$work/dist" .
"$py" -m build --sdist --no-isolation --outdir "$work/dist" . >"$work/sdist.log" 2>&1 || { tail -30 "$work/sdist.log"; exit 1; }
wheel=$(ls "$work"/dist/softprompt_kernels-*.whl)
sdist=$(ls "$work"/dist/softprompt_kernels-*.tar.gz)
if grep -qi "deprecat" "$work/sdist.log"; then grep -i -B2 -A2 "deprecat" "$work/sdist.log"; echo "setuptools deprecation warning"; exit 1; fi
"$py" - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
for needed in ("softprompt_kernels/ops/prefix_attention/triton.py", "softprompt_kernels/hf/compat.py", "softprompt_kernels/bench/run.py",
               "softprompt_kernels/serving/bank.py"):
    assert needed in names, f"{needed} missing from the wheel"
assert any(n.startswith("softprompt_kernels/_C") and n.endswith(".so") for n in names), "no _C extension in the wheel"
members = tarfile.open(sdist).getnames()
for needed in ("csrc/prefix_attention/ops.cpp", "csrc/cuda/decode_kernel.cuh", "csrc/prefix_attention/cuda_forward.h", "csrc/op_args.h", "LICENSE", "setup.py"):
    assert any(m.endswith("/" + needed) for m in members), f"{needed} missing from the sdist"
print(f"wheel: {len(names)} files; sdist: {len(members)} members")
PY

echo "==> a fresh venv with the wheel (torch from the local CPU build)"
python3 -m venv "$work/venv"
venv="$work/venv/bin"
"$venv/python" -m pip install -q --upgrade pip
"$venv/python" -m pip install -q torch==2.13.0
"$venv/python" -m pip install -q "$wheel[hf,triton,bench,serve,train]"

check_install() {  # run from outside the checkout, so that only the installed package can be imported
  (cd "$work" && "$venv/python" - <<'PY'
import importlib, pkgutil, sys
import torch
import softprompt_kernels as sk
assert sk.__file__.startswith(sys.prefix), f"imported {sk.__file__}, not the installed package"
names = [m.name for m in pkgutil.walk_packages(sk.__path__, "softprompt_kernels.") if not m.name.endswith(".__main__")]
for name in names:
    importlib.import_module(name)
print(f"imported {len(names)} submodules of softprompt_kernels {sk.__version__} from {sk.__path__[0]}")
q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
pk, pv = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
assert sk.resolve_backend(q, k, v, pk, pv) == "cpu", sk.backend_status()
out = sk.prefix_attention(q, k, v, pk, pv)
torch.testing.assert_close(out, sk.prefix_attention(q, k, v, pk, pv, backend="torch"), rtol=1e-5, atol=1e-5)
print("prefix_attention on the cpu backend matches the torch backend")
PY
  )
}
check_install
(cd "$work" && "$venv/softprompt-kernels" bench --help >/dev/null && "$venv/softprompt-kernels" bench --suite cpu-quick \
   --out "$work/bench" --reps 2 | tail -7)
test -s "$work/bench/cpu-quick.json" && test -s "$work/bench/cpu-quick.png"
# softprompt-kernels train (one run and a sweep) on the packaged toy task, from the wheel
(cd "$work" && "$venv/softprompt-kernels" bench --suite train-cpu-quick --out "$work/bench" | tail -3)
test -s "$work/bench/train-cpu-quick.json"

echo "==> the same venv, softprompt-kernels built from the sdist"
"$venv/python" -m pip uninstall -q -y softprompt-kernels
"$venv/python" -m pip install -q "setuptools>=77" wheel ninja
"$venv/python" -m pip install -q --no-build-isolation --no-deps "$sdist"
check_install
echo "package check passed"
