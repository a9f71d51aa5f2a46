"""GPU correctness checks + per-kernel timings + the layer benchmark, in one process.

    python benchmarks/gpu_check.py [--bench {none,quick,full,ranks}]

Correctness: ``lora_linear(..., kernels="triton")`` in bf16 (W, x bf16; adapters bf16 and
fp32) against the float64 torch reference with the op's own seed (same mask):
‖out−ref‖/‖ref‖ for y, dX, dA, dB. Also: deterministic mode twice -> bitwise equal, and
a CUDA-graph capture + replay of forward+backward.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cuda_graph import capture
from lorafusion_compiler.codegen import kernels as tk
from lorafusion_compiler.ops import reference as ref
from lorafusion_compiler.ops.dropout_mask import new_keep_bits
from lorafusion_compiler.ops.lora_linear import lora_linear

CHECK_SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16), (8192, 5120, 5120, 16),
                (8192, 8192, 8192, 16), (2048, 4096, 4096, 16), (8192, 4096, 4096, 8), (8192, 4096, 4096, 64),
                (8192, 4096, 4096, 128), (1000, 4000, 3000, 24), (333, 1000, 777, 256)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def operands(m: int, k: int, n: int, r: int, *, adapter_dtype: torch.dtype = torch.bfloat16, grad: bool = True):
    """(x [m,k], W [n,k]/√k, A [r,k]/√k, B [n,r], dY [m,n]) on the GPU: bf16, A and B in
    ``adapter_dtype``; x, A and B require grad when ``grad``."""
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=grad)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k)
    a = (torch.randn(r, k, device=dev, dtype=adapter_dtype) / math.sqrt(k)).requires_grad_(grad)
    b = torch.randn(n, r, device=dev, dtype=adapter_dtype).requires_grad_(grad)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    return x, w, a, b, dy


def check(m, k, n, r, p, adapter_dtype, bias: bool, deterministic: bool = False) -> dict[str, float]:
    """Relative errors of y, dX, dA, dB (bf16 base) vs the float64 reference."""
    x, w, a, b, dy = operands(m, k, n, r, adapter_dtype=adapter_dtype)
    bb = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    scale = 32.0 / r
    y, _s, seed, _bits = lora_linear(x, w, bb, a, b, scale, p, torch.bfloat16, "triton", deterministic)
    y.backward(dy)
    d = torch.float64
    x64, w64, a64, b64, dy64 = x.detach().to(d), w.to(d), a.detach().to(d), b.detach().to(d), dy.to(d)
    s64 = ref.shrink(x64, a64, seed, p)
    y64 = ref.base_expand(x64, w64, None if bb is None else bb.to(d), s64, b64, scale, d)
    ds64, db64 = ref.ds_db(dy64, b64, s64, scale)
    da64 = ref.da(x64, ds64, seed, p, d)
    dx64 = ref.dx(dy64, w64, ds64, a64, seed, p, d)
    return {"y": rel(y, y64), "dX": rel(x.grad, dx64), "dA": rel(a.grad, da64), "dB": rel(b.grad, db64)}


def check_deterministic(m=2048, k=4096, n=4096, r=16, p=0.1) -> bool:
    torch.manual_seed(1)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ds = torch.randn(m, r, device="cuda")
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor(42, device="cuda")
    outs = [(tk.ds_db(dy, b, ds, 2.0, deterministic=True), tk.da(x, ds, seed, p, torch.bfloat16, deterministic=True))
            for _ in range(2)]
    (d1, a1), (d2, a2) = outs
    return all(torch.equal(u, v) for u, v in zip((*d1, a1), (*d2, a2)))


def check_graph(m=2048, k=4096, n=4096, r=16, p=0.1) -> float:
    """Capture forward+backward in a CUDA graph; replay; rel error of dA vs an eager run with the same seed."""
    x, w, a, b, dy = operands(m, k, n, r)

    def step():
        y, _, seed, _ = lora_linear(x, w, None, a, b, 2.0, p, torch.bfloat16, "triton", True)
        y.backward(dy)
        return y, seed

    g, (y, seed) = capture(step, clear=(x, a, b))
    g.replay()
    torch.cuda.synchronize()
    seed_used = seed.clone()
    s64 = ref.shrink(x.detach().double(), a.detach().double(), seed_used, p)
    ds64, _ = ref.ds_db(dy.double(), b.detach().double(), s64, 2.0)
    da64 = ref.da(x.detach().double(), ds64, seed_used, p, torch.float64)
    return rel(a.grad, da64)


def kernel_times(m=8192, k=4096, n=4096, r=16, p=0.1) -> str:
    """Median GPU ms of each kernel (CUDA-graph replays, so host overhead is excluded) vs cuBLAS."""
    from triton.testing import do_bench_cudagraph
    dev = "cuda"
    x, w, a, b, dy = operands(m, k, n, r, grad=False)
    seed = torch.tensor(7, device=dev)
    s = tk.shrink(x, a, seed, p)
    ds, _ = tk.ds_db(dy, b, s, 2.0)
    bits = new_keep_bits(x, p, min(r, 64))  # also timed at r > 64, where the op does not use bits
    fns = {
        "cublas x@W^T": lambda: x @ w.t(),
        "cublas dy@W": lambda: dy @ w,
        "shrink": lambda: tk.shrink(x, a, seed, p),
        "base_expand": lambda: tk.base_expand(x, w, None, s, b, 2.0, torch.bfloat16),
        "ds_db": lambda: tk.ds_db(dy, b, s, 2.0),
        "da": lambda: tk.da(x, ds, seed, p, torch.bfloat16),
        "dx": lambda: tk.dx(dy, w, ds, a, seed, p, torch.bfloat16),
        **({"da +bits": lambda: tk.da(x, ds, seed, p, torch.bfloat16, keep_bits=bits),  # what the op's backward runs
            "dx bits": lambda: tk.dx(dy, w, ds, a, seed, p, torch.bfloat16, keep_bits=bits)} if bits is not None else {}),
        "ds_db det": lambda: tk.ds_db(dy, b, s, 2.0, deterministic=True),
        "da det": lambda: tk.da(x, ds, seed, p, torch.bfloat16, deterministic=True),
    }
    for fn in fns.values():
        fn()  # tune outside the graph
    t = {name: do_bench_cudagraph(fn, return_mode="median") for name, fn in fns.items()}
    from lorafusion_compiler.codegen.autotune import tuned_choices
    chosen = "; ".join(f"{key[0]} M~{key[2]} {key[3]}: {cfg.describe()}"
                       for key, cfg in tuned_choices().items() if key[2] == triton_next_pow2(m))
    return f"kernel ms @ {(m, k, n, r, p)}: " + ", ".join(f"{kk} {v:.3f}" for kk, v in t.items()) + f"\n  tuned: {chosen}"


def triton_next_pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def host_time(fn, iters: int) -> tuple[float, float]:
    """(host submit, wall) seconds per call of ``fn`` over ``iters`` calls, after a device sync."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters, (time.perf_counter() - t0) / iters


def profile(m: int, k: int, n: int, r: int = 16, p: float = 0.1) -> str:
    """torch.profiler table of one fwd+bwd of ours, plus the CUDA-graph-replay time (no host overhead)."""
    from torch.profiler import ProfilerActivity, profile as prof
    x, w, a, b, dy = operands(m, k, n, r)

    def step():
        lora_linear(x, w, None, a, b, 2.0, p, torch.bfloat16, "triton", False)[0].backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40)
    table2 = pr.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=40)
    submit, wall = host_time(step, 20)
    return f"profile {(m, k, n, r, p)}: host submit {submit * 1e3:.3f} ms/step, wall {wall * 1e3:.3f} ms/step\n{table}\n{table2}"


class _DirectFn(torch.autograd.Function):
    """The same five launchers behind a plain autograd.Function (host-overhead comparison only)."""

    @staticmethod
    def forward(ctx, x, w, a, b, p):
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
        s = tk.shrink(x, a, seed, p)
        ctx.save_for_backward(x, w, a, b, s, seed)
        ctx.p = p
        return tk.base_expand(x, w, None, s, b, 2.0, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b, s, seed = ctx.saved_tensors
        ds, db = tk.ds_db(dy, b, s, 2.0)
        return tk.dx(dy, w, ds, a, seed, ctx.p, x.dtype), None, tk.da(x, ds, seed, ctx.p, a.dtype), db, None


def overhead(m: int = 64, k: int = 256, n: int = 256, r: int = 16, p: float = 0.1) -> str:
    """Host microseconds per call (tiny shapes, so the GPU never limits)."""
    dev = "cuda"
    x, w, a, b, dy = operands(m, k, n, r)
    seed = torch.tensor(3, device=dev)
    s = tk.shrink(x.detach(), a.detach(), seed, p)
    ds, _ = tk.ds_db(dy, b.detach(), s, 2.0)
    kern = tk._prepare("shrink", dtype="bfloat16", adapter_dtype="bfloat16", dropout=True, rank_bucket=16, aligned8=True)[0]
    out = torch.empty(m, r, device=dev, dtype=torch.bfloat16)
    xd, ad = x.detach(), a.detach()
    cases = {
        "torch.empty": lambda: torch.empty(m, r, device=dev),
        "torch.zeros": lambda: torch.zeros(m, r, device=dev),
        "randint seed": lambda: torch.randint(0, 2**62, (), dtype=torch.int64, device=dev),
        "raw shrink launch": lambda: kern[(1,)](xd, ad, out, seed, m, k, r, 6554, 1.1, m * r, *xd.stride(), *ad.stride(),
                                               *out.stride(), BLOCK_R=16, BLOCK_M=64, BLOCK_K=128, K_SPLIT=1,
                                               num_warps=4, num_stages=3),
        "tk.shrink": lambda: tk.shrink(xd, ad, seed, p),
        "tk.base_expand": lambda: tk.base_expand(xd, w, None, s, b.detach(), 2.0, torch.bfloat16),
        "tk.ds_db": lambda: tk.ds_db(dy, b.detach(), s, 2.0),
        "tk.da": lambda: tk.da(xd, ds, seed, p, torch.bfloat16),
        "tk.dx": lambda: tk.dx(dy, w, ds, ad, seed, p, torch.bfloat16),
        "op fwd (no grad)": lambda: lora_linear(xd, w, None, ad, b.detach(), 2.0, p, torch.bfloat16, "triton", False),
        "op fwd+bwd triton": lambda: lora_linear(x, w, None, a, b, 2.0, p, torch.bfloat16, "triton", False)[0].backward(dy),
        "autograd.Function fwd+bwd triton": lambda: _DirectFn.apply(x, w, a, b, p).backward(dy),
        "op fwd+bwd torch": lambda: lora_linear(x, w, None, a, b, 2.0, p, torch.bfloat16, "torch", False)[0].backward(dy),
    }
    res = []
    for name, fn in cases.items():
        for _ in range(5):
            fn()
        res.append(f"{name} {host_time(fn, 100)[0] * 1e6:.1f}")
    return "host us/call: " + ", ".join(res)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", choices=["none", "quick", "full", "ranks"], default="full")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quick-check", action="store_true", help="check 4 of the shapes only")
    args = parser.parse_args()
    print("torch", torch.__version__, "| triton", __import__("triton").__version__, "|", torch.cuda.get_device_name())
    lines = []
    if not args.no_check:
        torch.manual_seed(0)
        worst = {}
        shapes = [CHECK_SHAPES[i] for i in (0, 5, 9, 10)] if args.quick_check else CHECK_SHAPES
        for (m, k, n, r) in shapes:
            for p in (0.0, 0.1):
                for adt in (torch.bfloat16, torch.float32):
                    if adt == torch.float32 and (m, k, n) not in ((8192, 4096, 4096), (1000, 4000, 3000)):
                        continue
                    e = check(m, k, n, r, p, adt, bias=(m == 1000))
                    lines.append(f"check {m}x{k}x{n} r={r} p={p} A/B {str(adt)[6:]}: " + " ".join(f"{kk} {v:.1e}" for kk, v in e.items()))
                    print(lines[-1], flush=True)
                    for kk, v in e.items():
                        worst[kk] = max(worst.get(kk, 0.0), v)
        lines.append("worst rel err: " + " ".join(f"{kk} {v:.1e}" for kk, v in worst.items()) + (" PASS" if max(worst.values()) <= 1e-2 else " FAIL"))
        lines.append(f"deterministic bitwise: {check_deterministic()}")
        lines.append(f"cuda graph replay dA rel err: {check_graph():.1e}")
        print("\n".join(lines[-3:]), flush=True)
    if args.profile:
        print(overhead(), flush=True)
        print(profile(2048, 4096, 4096), flush=True)
    lines.append(kernel_times())
    lines.append(kernel_times(p=0.0))
    lines.append(kernel_times(m=2048, p=0.1))
    lines.append(kernel_times(m=2048, p=0.0))
    lines.append(kernel_times(r=128, p=0.1))
    print("\n".join(lines[-5:]), flush=True)
    if args.bench != "none":
        import layer
        torch._dynamo.config.cache_size_limit = 64
        shapes = [layer.SHAPES[0], layer.SHAPES[5]] if args.bench == "quick" else layer.SHAPES
        if args.bench == "ranks":
            rows = layer.run(layer.SHAPES[:1], [8, 64, 128], [0.0, 0.1], memory=True)
        else:
            rows = layer.run(shapes, [16], [0.0, 0.1], memory=True)
        print("\n=== summary ===")
        print("\n".join(l for l in lines if l.startswith(("worst", "determ", "cuda", "kernel"))))
        for row in rows:
            print(layer._fmt(row))
        print(layer.summary(rows))


if __name__ == "__main__":
    main()
