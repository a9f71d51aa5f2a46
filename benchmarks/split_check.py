"""Split-kernel check: shrink, ds_db and dA of each kernel set against a plain read of x, under sustained load.

For each (M, K, N), r=16, bf16 x / dY and PEFT's fp32 adapters: shrink (p=0 and p=0.1), ds_db, dA
(p=0, and p=0.1 storing the keep bits as the op does before dX) of the kernel sets named by
``--sets``, and ``x.sum()`` (one read of x: the floor of shrink and dA). A figure is the median
over interleaved rounds of one call's GPU time, from CUDA graphs of CALLS_PER_GRAPH calls after a
burn-in (``timing.burn_in``); the last column divides it by the read of x.

    python benchmarks/split_check.py                       # four LLaMa-8B shapes, triton and gluon sets
    python benchmarks/split_check.py --shapes 8192x4096x4096 --sets triton
"""

from __future__ import annotations

import argparse
import math

import torch
from cuda_graph import replay_of_calls
from timing import burn_in, interleaved_ms

from lorafusion_compiler.ops import get_kernel_set
from lorafusion_compiler.ops.dropout_mask import new_keep_bits

__all__ = ["SHAPES", "kernel_calls", "main", "parse_shape"]

SHAPES = [(8192, 4096, 4096), (4096, 4096, 4096), (4096, 14336, 4096), (2048, 4096, 4096)]
"""(M, K, N): the layer benchmark's first shape, a LLaMa-8B projection at 4096 tokens, the down
projection's (K = 14336, where dA reads the widest x) and the small-M shape."""

R, P, CALLS_PER_GRAPH = 16, 0.1, 10


def parse_shape(text: str) -> tuple[int, int, int]:
    """"MxKxN" -> (M, K, N), positive integers."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r} must be MxKxN with positive integers, e.g. 8192x4096x4096")
    return tuple(int(p) for p in parts)


def kernel_calls(m: int, k: int, n: int, sets: list[str], *, device: str = "cuda") -> dict[str, callable]:
    """Name -> zero-argument call of every timed kernel for one shape ("read x" and, per set, the five rows)."""
    bf = torch.bfloat16
    x = torch.randn(m, k, device=device, dtype=bf)
    dy = torch.randn(m, n, device=device, dtype=bf)
    a = torch.randn(R, k, device=device) / math.sqrt(k)
    b = torch.randn(n, R, device=device) * 0.01
    s_act = torch.randn(m, R, device=device)
    ds = torch.randn(m, R, device=device)
    seed = torch.tensor(7, device=device)
    bits = new_keep_bits(x, P, R)
    calls = {"read x (x.sum)": lambda: x.sum()}
    for name in sets:
        ks = get_kernel_set(name)
        calls |= {
            f"{name} shrink p=0": lambda ks=ks: ks.shrink(x, a, seed, 0.0),
            f"{name} shrink p={P}": lambda ks=ks: ks.shrink(x, a, seed, P),
            f"{name} ds_db": lambda ks=ks: ks.ds_db(dy, b, s_act, 2.0),
            f"{name} dA p=0": lambda ks=ks: ks.da(x, ds, seed, 0.0, torch.float32),
            f"{name} dA p={P} + keep bits": lambda ks=ks: ks.da(x, ds, seed, P, torch.float32, keep_bits=bits),
        }
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=SHAPES, metavar="MxKxN")
    parser.add_argument("--sets", nargs="+", default=["triton", "gluon"], help="kernel sets (ops.kernel_set.KERNEL_SETS)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, r={R}, bf16 x, fp32 adapters; µs per call")
    for m, k, n in args.shapes:
        graphs = {name: replay_of_calls(fn, CALLS_PER_GRAPH) for name, fn in kernel_calls(m, k, n, args.sets).items()}
        burn_in(seconds=1.0)
        ms = interleaved_ms(graphs, rounds=args.rounds, warmup=2)
        read = ms["read x (x.sum)"]
        print(f"\n{m}x{k}x{n}")
        for name, t in ms.items():
            print(f"  {name:<34} {t / CALLS_PER_GRAPH * 1e3:8.1f}  {t / read:6.2f}x read")


if __name__ == "__main__":
    main()
