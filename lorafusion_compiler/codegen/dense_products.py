"""The mask-free low-rank products as cuBLAS matmuls, where those beat the generated kernels.

Without dropout (p = 0) three products of the split-at-r graph are plain GEMMs with a skinny side:

    shrink:  S  = x·Aᵀ                   [M, r]   (x [M, K], A [r, K])
    ds_db:   dS = s·dY·B,  dB = s·dYᵀ·S   [M, r], [N, r]
    da:      dA = dSᵀ·x                  [r, K]

cuBLAS runs them near memory speed at every rank, while the generated kernels fall behind as r grows
(H200, 8192x4096x4096, bf16, CUDA graphs, µs, Triton kernel vs cuBLAS, seventeenth session,
docs/kernels.md "The cuBLAS route"): shrink r=32 33.7 vs 19.9, r=128 59.0 vs 21.9; dA r=32 35.5 vs
23.7, r=128 103.9 vs 21.1; dS+dB r=32 40.1 vs 40.9, r=64 54.8 vs 40.6, r=128 162.5 vs 42.4. So from
``MIN_RANK[kernel]`` on, the kernel sets send these calls here. The numerics are the kernels': operands
in the activations' dtype (the adapters and dS rounded to it), fp32 accumulation and fp32 results
(``torch.mm(..., out_dtype=torch.float32)``), the scale applied in fp32, outputs in the kernels' dtypes.
"""

from __future__ import annotations

import torch

__all__ = ["MIN_RANK", "applies", "da", "ds_db", "shrink"]

MIN_RANK = {"shrink": 32, "da": 32, "ds_db": 64}
"""Smallest rank at which each product runs as a cuBLAS matmul (measured above)."""

_HALF = (torch.float16, torch.bfloat16)


def applies(kernel: str, *, activations: torch.Tensor, rank: int, p: float = 0.0) -> bool:
    """Whether ``kernel`` ("shrink", "da" or "ds_db") runs here: a CUDA tensor of fp16 or bf16 activations
    (x or dY), no dropout, and ``rank`` at least ``MIN_RANK[kernel]``."""
    if kernel not in MIN_RANK:
        raise ValueError(f"kernel={kernel!r} is not one of {sorted(MIN_RANK)}")
    return activations.is_cuda and activations.dtype in _HALF and p == 0.0 and rank >= MIN_RANK[kernel]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b of two fp16/bf16 matrices of one dtype, accumulated and returned in fp32."""
    return torch.mm(a, b, out_dtype=torch.float32)


def shrink(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """S = x·Aᵀ: x [M, K], A [r, K] -> [M, r] fp32."""
    return _mm(x, lora_a.to(x.dtype).t())


def ds_db(dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s·dY·B [M, r] (fp32) and dB = s·dYᵀ·S [N, r] (B's dtype): dY [M, N], B [N, r], S [M, r]."""
    d_s = _mm(dy, lora_b.to(dy.dtype)).mul_(scale)
    d_b = _mm(dy.t(), s_act.to(dy.dtype)).mul_(scale)
    return d_s, d_b.to(lora_b.dtype)


def da(x: torch.Tensor, ds: torch.Tensor, a_dtype: torch.dtype) -> torch.Tensor:
    """dA = dSᵀ·x: x [M, K], dS [M, r] -> [r, K] in ``a_dtype``."""
    return _mm(ds.to(x.dtype).t(), x).to(a_dtype)
