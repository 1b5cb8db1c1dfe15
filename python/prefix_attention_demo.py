"""A batch whose rows use different soft prompts, through every backend this machine can run.

    python python/prefix_attention_demo.py [--device cuda] [--dtype bfloat16]

Builds what a Hugging Face attention layer would hand over (q/k/v as transposed views of the
projections), a bank of three prefixes of different lengths, a left-padded batch with one row
without a prompt, and runs forward + backward on each backend next to the PEFT-style ``torch``
path: largest differences, time per call and where the prefix gradients went.
"""
import argparse
import os
import time

import torch

import softprompt_kernels as sk


def build_inputs(device, dtype, B=6, Hq=8, Hkv=2, L=96, D=64, K=24):
    gen = torch.Generator().manual_seed(0)

    def proj(heads):  # [B, L, H*D] projection viewed as [B, H, L, D]: no copy, as in HF
        return torch.randn(B, L, heads * D, generator=gen).view(B, L, heads, D).transpose(1, 2)

    q, k, v = proj(Hq), proj(Hkv), proj(Hkv)
    prefix_k = torch.randn(3, Hkv, K, D, generator=gen)
    prefix_v = torch.randn(3, Hkv, K, D, generator=gen)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v, prefix_k, prefix_v)]
    lengths = torch.tensor([96, 80, 96, 40, 96, 70])
    kwargs = dict(
        prompt_ids=torch.tensor([0, 1, 2, 2, -1, 0], device=device),  # row 4 has no prompt
        prefix_lens=torch.tensor([24, 10, 16], device=device),          # three prompt lengths
        key_padding_mask=(torch.arange(L)[None, :] >= L - lengths[:, None]).to(device),  # left padding
        causal=True,
    )
    return tensors, kwargs


def run(backend, tensors, kwargs, grad):
    out = sk.prefix_attention(*tensors, **kwargs, backend=backend)
    grads = torch.autograd.grad(out, tensors, grad)
    return [out] + list(grads)


def timed(backend, tensors, kwargs, grad, reps=10):
    run(backend, tensors, kwargs, grad)  # warm-up (Triton compiles and tunes on first use)
    if tensors[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        run(backend, tensors, kwargs, grad)
    if tensors[0].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device of the inputs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of q, k, v and the prefix bank")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    tensors, kwargs = build_inputs(args.device, dtype)
    grad = torch.randn_like(tensors[0])

    print(f"backends on this install: {sk.available_backends()}  (status: {sk.backend_status()})")
    print(f"auto picks: {sk.resolve_backend(*tensors, **kwargs)}")
    reference = run("torch", tensors, kwargs, grad)
    names = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for backend in sk.available_backends():
        reasons = sk.not_supported_reasons(backend, *tensors, **kwargs)
        if reasons:
            print(f"{backend:>7}: skipped ({'; '.join(reasons)})")
            continue
        results = run(backend, tensors, kwargs, grad)
        diffs = ", ".join(f"{n} {(a.float() - b.float()).abs().max().item():.1e}"
                          for n, a, b in zip(names, results, reference))
        interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        ms = "interpreted" if interpreted else f"{timed(backend, tensors, kwargs, grad):7.2f} ms"
        print(f"{backend:>7}: {ms} fwd+bwd | max |diff| vs torch: {diffs}")

    dprefix_k = reference[4]
    print("prefix_k gradient norm per prompt and slot range (slots past prefix_lens get zero):")
    for p, n in enumerate(kwargs["prefix_lens"].tolist()):
        used, unused = dprefix_k[p, :, :n].norm().item(), dprefix_k[p, :, n:].norm().item()
        print(f"  prompt {p}: slots [0, {n}) norm {used:.3f}, slots [{n}, K) norm {unused:.1f}")


if __name__ == "__main__":
    main()
