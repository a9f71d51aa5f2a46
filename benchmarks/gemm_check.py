"""GEMM check: our GEMMs against cuBLAS under sustained load, one shape at a time.

For each (M, K, N), r=16: the `tl` fused GEMMs of the kernel set (base_expand = x·Wᵀ + s·S·Bᵀ;
dX = dY·W + m ⊙ dS·A/(1-p) at p=0 and reading keep bits at p=0.1) against cuBLAS x·Wᵀ and dY·W,
and on Hopper the Gluon kernels (`lorafusion_compiler.codegen.gluon`): the fused base_expand and dX
of the "gluon-gemms" kernel set, and the plain GEMM (both variants, layouts "nt" for x·Wᵀ and "nn" for
dY·W) as the reference of what a GEMM reaches here. These are times at the clocks of a burn-in: for energy,
which decides at the power cap where a training step runs, see ``power.py gemms``. The GPU first runs a burn-in (`timing.burn_in`), then every
round times each CUDA graph (5 calls per graph) in a shuffled order; a figure is the median over
rounds of (kernel ÷ cuBLAS in the same round), with its interquartile range. The Gluon GEMMs are
checked against cuBLAS's result first (max error ÷ max |cuBLAS|).

    python benchmarks/gemm_check.py              # five LLaMa-8B shapes, 12 rounds
    python benchmarks/gemm_check.py --quick      # 8192×4096×4096 only
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from cuda_graph import replay_of_calls
from timing import burn_in, interleaved_ratios

from lorafusion_compiler.codegen import kernels as tk
from lorafusion_compiler.ops.dropout_mask import new_keep_bits

__all__ = ["SHAPES", "main", "shape_calls"]

SHAPES = [(4096, 4096, 4096), (4096, 4096, 1024), (4096, 4096, 14336), (4096, 14336, 4096), (8192, 4096, 4096)]
"""(M, K, N): the projections of a LLaMa-3.1-8B layer at 4096 tokens, and the layer benchmark's first shape."""

R, P, CALLS_PER_GRAPH = 16, 0.1, 5


def shape_calls(m: int, k: int, n: int, *, gluon: bool) -> tuple[dict, dict, dict[str, float]]:
    """(forward calls, backward calls, Gluon errors vs cuBLAS) for one shape; the references are
    "cuBLAS x·Wᵀ" and "cuBLAS dY·W"."""
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=bf)
    w = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(bf)
    dy = torch.randn(m, n, device=dev, dtype=bf)
    a = (torch.randn(R, k, device=dev) / math.sqrt(k)).to(bf)
    b = (torch.randn(n, R, device=dev) * 0.01).to(bf)
    s_act = torch.randn(m, R, device=dev, dtype=bf)
    ds = torch.randn(m, R, device=dev)
    seed = torch.tensor(7, device=dev)
    bits = new_keep_bits(x, P, R)
    tk.da(x, ds, seed, P, bf, keep_bits=bits)
    fwd = {"cuBLAS x·Wᵀ": lambda: x @ w.t(), "tl base_expand": lambda: tk.base_expand(x, w, None, s_act, b, 2.0, bf)}
    bwd = {"cuBLAS dY·W": lambda: dy @ w, "tl dX p=0": lambda: tk.dx(dy, w, ds, a, seed, 0.0, bf),
           "tl dX keep bits": lambda: tk.dx(dy, w, ds, a, seed, P, bf, keep_bits=bits)}
    errors = {}
    if gluon:
        from lorafusion_compiler.codegen.gluon import DEFAULT_CONFIGS, gemm, lora_gemm

        fwd["gluon base_expand"] = lambda: lora_gemm.base_expand(x, w, None, s_act, b, 2.0, bf)
        bwd["gluon dX p=0"] = lambda: lora_gemm.dx(dy, w, ds, a, 0.0, bf)
        bwd["gluon dX keep bits"] = lambda: lora_gemm.dx(dy, w, ds, a, P, bf, keep_bits=bits)

        refs = {"nt": (x @ w.t()).float(), "nn": (dy @ w).float()}
        for variant, cfg in DEFAULT_CONFIGS.items():
            fwd[f"gluon {variant}"] = lambda cfg=cfg: gemm(x, w, b_layout="nt", config=cfg)
            bwd[f"gluon {variant}"] = lambda cfg=cfg: gemm(dy, w, b_layout="nn", config=cfg)
            for side, ref in refs.items():
                got = (fwd if side == "nt" else bwd)[f"gluon {variant}"]().float()
                errors[f"{variant} {side}"] = ((got - ref).abs().max() / ref.abs().max()).item()
    return fwd, bwd, errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8192×4096×4096 only")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    gluon = torch.cuda.get_device_capability()[0] == 9
    print("torch", torch.__version__, "| triton", __import__("triton").__version__, "|", torch.cuda.get_device_name(),
          "| Gluon GEMM:", "yes" if gluon else "no (needs sm_90)")
    started = time.perf_counter()
    table = []
    for m, k, n in SHAPES[-1:] if args.quick else SHAPES:
        fwd, bwd, errors = shape_calls(m, k, n, gluon=gluon)
        if errors:
            print(f"{m}x{k}x{n} Gluon max error / max |cuBLAS|: " + ", ".join(f"{key} {e:.1e}" for key, e in errors.items()))
        for calls, reference in ((fwd, "cuBLAS x·Wᵀ"), (bwd, "cuBLAS dY·W")):
            graphs = {name: replay_of_calls(fn, CALLS_PER_GRAPH) for name, fn in calls.items()}
            burn_in(seconds=1.0)
            ratios = interleaved_ratios(graphs, reference=reference, rounds=args.rounds)
            table += [((m, k, n), name, *ratios[name]) for name in calls if name != reference]
            del graphs
    print(f"\nkernel time ÷ cuBLAS time of the same round (median over {args.rounds} rounds after a burn-in; IQR)")
    for (m, k, n), name, median, iqr in table:
        print(f"{m:5d}x{k:5d}x{n:5d}  {name:22s} {median:6.3f}  [{iqr:.3f}]")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
