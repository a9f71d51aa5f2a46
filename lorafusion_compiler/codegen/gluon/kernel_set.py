"""The ``"gluon"`` kernel set (``options={"kernels": "gluon"}``; ``"auto"`` picks it for bf16 with CUDA
graphs on Hopper, ``backend.kernel_set_for``): the ``"triton"`` set with its memory-bound kernels in Gluon
where they apply: ``shrink`` and ``da`` by ``split_kernels`` (``split_applies``: r ≤ 64, unless p = 0 and
r ≥ 32, where cuBLAS is faster: ``dense_products``), ``ds_db`` by ``gluon/ds_db.py`` (``ds_db_applies``:
r ≤ 32, atomics allowed). At p > 0 the op has the Gluon shrink store the mask as keep bits for the
backward where ``saves_keep_bits`` (the Gluon dA then reads them). Everything else is the ``"triton"`` set's
(``triton_set``: ``tl`` kernels or cuBLAS matmuls): the deterministic ``ds_db`` and ``da``, the
multi-adapter launchers, and the two fused GEMMs ``base_expand`` and ``dx``.

The fused GEMMs stay Triton's because of power, not speed: on an H200 at its 700 W cap (where a training
step runs) a kernel's time is its energy ÷ the cap, and the warp-specialised Gluon GEMMs (``lora_gemm``),
faster on a cool GPU, spend up to 6% more energy per GEMM than the ``tl`` ones at 4096 tokens; the 8-layer
LLaMa-8B step ran 0.933× the floor with them against 0.954× without (BENCHMARKS.md, twenty-second
session). The ``"gluon-gemms"`` set (``gemm_set``) runs them.
"""

from __future__ import annotations

import torch

from ...ops.dropout_mask import KEEP_BITS_MAX_RANK, drop_threshold
from .. import dense_products as _dense
from .. import triton_set as _tl
from ..kernels import _tma_rows
from ..triton_set import base_expand, dx, multi_backward, multi_forward

__all__ = ["base_expand", "da", "ds_db", "ds_db_applies", "dx", "multi_backward", "multi_forward", "saves_keep_bits",
           "shrink", "split_applies"]


def _hopper(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] == 9


_ADAPTER_DTYPES = (torch.bfloat16, torch.float32)
"""Low-rank operands may be fp32 (PEFT's default adapters): they are rounded to bf16 as the Triton
kernels round them before their dots (bitwise the same products), in the Gluon kernels themselves
(the split kernels and ds_db round their tiles in shared memory; the ``"gluon-gemms"`` GEMMs:
``lora_gemm._right_operand``, ``fp32_low_is_free``) or by a cast before the launch."""


def split_applies(x: torch.Tensor, low: torch.Tensor, *, rank_dim: int, deterministic: bool = False) -> bool:
    """Whether ``shrink`` (low = A [r, K], rank_dim 0) or ``da`` (low = dS [M, r], rank_dim 1) runs in Gluon:
    a Hopper GPU, x bf16 [M, K] non-empty, row-major with K % 8 == 0, the low-rank operand fp32 or bf16 with its rank
    in ``split_kernels.ROUTED_RANKS``, and (dA) atomics allowed (the deterministic dA is the ``tl`` one)."""
    from .split_kernels import ROUTED_RANKS

    return (not deterministic and _hopper(x) and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[1] % 8 == 0
            and x.numel() > 0 and _tma_rows(x) and low.dtype in _ADAPTER_DTYPES and low.dim() == 2
            and low.shape[rank_dim] in ROUTED_RANKS and _tma_rows(low))


def saves_keep_bits(x: torch.Tensor, lora_a: torch.Tensor, p: float, *, deterministic: bool = False) -> bool:
    """Whether the forward's shrink stores the mask as keep bits, saved for the backward's dA and dX
    (``reference.saves_keep_bits``): p > 0 on a Hopper GPU with x bf16 [M, K], K % 128 == 0 (the Gluon dA
    reads the bits through TMA), A fp32 or bf16 [r, K] with r in ``split_kernels.ROUTED_RANKS``, atomics
    allowed (the deterministic dA is the ``tl`` one, which regenerates the mask). Then the mask is computed
    once per step instead of twice (H200, 8192×4096, r=16, p=0.1: dA 31.2 → 22.7 µs, shrink 26.4 → 28.3; M·K/8
    bytes more saved per call). Shapes, dtypes and device only: the op also asks with fake tensors."""
    from .split_kernels import ROUTED_RANKS

    return (drop_threshold(p) > 0 and not deterministic and _hopper(x) and x.dtype == torch.bfloat16 and x.dim() == 2
            and x.shape[1] % 128 == 0 and lora_a.dtype in _ADAPTER_DTYPES and lora_a.dim() == 2
            and lora_a.shape[0] in ROUTED_RANKS and lora_a.shape[0] <= KEEP_BITS_MAX_RANK)


def ds_db_applies(dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor, *, deterministic: bool = False) -> bool:
    """Whether ``ds_db`` runs in Gluon: a Hopper GPU, dY bf16 [M, N] non-empty, row-major with N % 8 == 0,
    B [N, r] fp32 or bf16 row-major with r in ``ds_db.SUPPORTED_RANKS``, S [M, r] fp32 or bf16 with unit
    column stride, and atomics allowed (the deterministic ds_db is the ``tl`` one)."""
    from .ds_db import SUPPORTED_RANKS

    return (not deterministic and _hopper(dy) and dy.dtype == torch.bfloat16 and dy.dim() == 2 and dy.shape[1] % 8 == 0
            and dy.numel() > 0 and _tma_rows(dy) and lora_b.dtype in _ADAPTER_DTYPES and lora_b.dim() == 2
            and lora_b.shape[1] in SUPPORTED_RANKS and _tma_rows(lora_b) and s_act.dtype in _ADAPTER_DTYPES
            and s_act.dim() == 2 and s_act.shape[1] == lora_b.shape[1] and s_act.stride(1) == 1)


def ds_db(dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor, scale: float, *,
          deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_set.ds_db``, in Gluon where ``ds_db_applies``."""
    if ds_db_applies(dy, lora_b, s_act, deterministic=deterministic):
        from .ds_db import ds_db as gluon_ds_db

        return gluon_ds_db(dy, lora_b, s_act, scale)
    return _tl.ds_db(dy, lora_b, s_act, scale, deterministic=deterministic)


def shrink(x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, p: float, *,
           deterministic: bool = False, keep_bits: torch.Tensor | None = None) -> torch.Tensor:
    """``triton_set.shrink``, in Gluon where ``split_applies`` and no cuBLAS matmul does it (p = 0, r ≥ 32);
    there, unless ``deterministic``, its partial sums meet in fp32 atomics, and ``keep_bits`` are stored by
    the kernel (elsewhere in torch, ``triton_set.shrink``)."""
    if split_applies(x, lora_a, rank_dim=0) and not _dense.applies("shrink", activations=x, rank=lora_a.shape[0], p=p):
        from .split_kernels import shrink as gluon_shrink

        return gluon_shrink(x, lora_a, seed, p, deterministic=deterministic, keep_bits=keep_bits)
    return _tl.shrink(x, lora_a, seed, p, deterministic=deterministic, keep_bits=keep_bits)


def da(x: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor, p: float, a_dtype: torch.dtype, *,
       deterministic: bool = False, keep_bits: torch.Tensor | None = None,
       stored_bits: torch.Tensor | None = None) -> torch.Tensor:
    """``triton_set.da``, in Gluon where ``split_applies`` and no cuBLAS matmul does it (p = 0, r ≥ 32); the
    Gluon one reads ``stored_bits`` (the mask shrink stored) instead of computing the mask."""
    if split_applies(x, ds, rank_dim=1, deterministic=deterministic) and not _dense.applies(
            "da", activations=x, rank=ds.shape[1], p=p):
        from .split_kernels import da as gluon_da

        return gluon_da(x, ds, seed, p, a_dtype, keep_bits=keep_bits, stored_bits=stored_bits)
    return _tl.da(x, ds, seed, p, a_dtype, deterministic=deterministic, keep_bits=keep_bits, stored_bits=stored_bits)
