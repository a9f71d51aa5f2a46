"""The ``"gluon"`` kernel set (``options={"kernels": "gluon"}``; ``"auto"`` picks it for bf16 with CUDA
graphs on Hopper, ``backend.kernel_set_for``): the ``"triton"`` set with its two fused GEMMs,
``base_expand`` and ``dx``, run by the warp-specialised Gluon kernels of ``lora_gemm`` wherever those
apply, ``shrink`` and ``da`` by the one of ``split_kernels`` (``split_applies``: r ≤ 64, unless p = 0
and r ≥ 32, where cuBLAS is faster: ``dense_products``), and as the
``"triton"`` set (``triton_set``: ``tl`` kernels or cuBLAS matmuls) everywhere else.

Gluon applies to a call when it runs on a Hopper GPU with non-empty activations, weight and output in
bfloat16 and the adapters in bfloat16 or float32 (rounded to bf16 first, as the Triton kernels
round them), row-major with sizes that are multiples of 8, a rank in ``lora_gemm.SUPPORTED_RANKS``,
a weight given, and (dx) the dropout mask given as keep bits when p > 0, with a ring still
``lora_gemm.MIN_DX_STAGES`` deep beside them (not at r = 64). ``ds_db`` runs in Gluon where
``ds_db_applies`` (``gluon/ds_db.py``: r ≤ 32, atomics allowed). The deterministic ``ds_db`` and
``da`` and the multi-adapter launchers are the ``"triton"`` set's. At p > 0 the op has the Gluon shrink
store the mask as keep bits for the backward where ``saves_keep_bits`` (the Gluon dA then reads them).
"""

from __future__ import annotations

import torch

from ...ops.dropout_mask import KEEP_BITS_MAX_RANK, drop_threshold
from .. import dense_products as _dense
from .. import triton_set as _tl
from ..kernels import _tma_rows
from ..triton_set import multi_backward, multi_forward

__all__ = ["base_expand", "da", "ds_db", "ds_db_applies", "dx", "gluon_applies", "multi_backward", "multi_forward",
           "saves_keep_bits", "shrink", "split_applies"]


def _hopper(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] == 9


_ADAPTER_DTYPES = (torch.bfloat16, torch.float32)
"""Low-rank operands may be fp32 (PEFT's default adapters): they are rounded to bf16 as the Triton
kernels round them before their dots (bitwise the same products), in the Gluon kernels themselves
(``lora_gemm._right_operand``, ``fp32_low_is_free``) or by a cast before the launch."""


def _tma_ok(t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> bool:
    """2-D, of one of ``dtypes``, both sizes multiples of 8; a bf16 one row-major with 16-byte aligned
    rows (what the TMA descriptors need; an fp32 one the kernel reads itself, ``lora_gemm._right_operand``)."""
    if t.dtype not in dtypes or t.dim() != 2 or t.shape[0] % 8 or t.shape[1] % 8:
        return False
    return t.dtype != torch.bfloat16 or _tma_rows(t)


def gluon_applies(kernel: str, *, a: torch.Tensor, weight: torch.Tensor | None, low: torch.Tensor,
                  right: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                  p: float = 0.0, keep_bits: torch.Tensor | None = None) -> bool:
    """Whether ``kernel`` ("base_expand" or "dx") runs in Gluon for these operands: ``a`` = x or dY,
    ``low`` = S or dS [M, r], ``right`` = B [N, r] or A [r, K]."""
    from .lora_gemm import SUPPORTED_RANKS, bias_ok, deep_ring

    if weight is None or out_dtype != torch.bfloat16 or not _hopper(a) or low.shape[1] not in SUPPORTED_RANKS:
        return False
    if a.numel() == 0 or weight.numel() == 0:  # no TMA descriptor for an empty tensor: the Triton kernels
        return False
    if not (_tma_ok(a) and _tma_ok(weight) and _tma_ok(right, _ADAPTER_DTYPES)):
        return False
    if kernel == "base_expand":
        return _tma_ok(low, _ADAPTER_DTYPES) and bias_ok(bias, weight.shape[0])
    # dS (fp32, from ds_db) is rounded to bf16 by lora_gemm; keep bits exist exactly when p > 0, and with
    # them the ring must stay deep (r=64: the Triton dX is faster)
    return (low.dtype in _ADAPTER_DTYPES and _tma_rows(low) and (p == 0.0) == (keep_bits is None)
            and (keep_bits is None or deep_ring(low.shape[1], bits_tma=_tma_rows(keep_bits))))


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


def base_expand(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, s_act: torch.Tensor,
                lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``kernels.base_expand``, in Gluon where ``gluon_applies``."""
    if gluon_applies("base_expand", a=x, weight=weight, low=s_act, right=lora_b, out_dtype=out_dtype, bias=bias):
        from .lora_gemm import base_expand as gluon_base_expand

        # an fp32 S (shrink's, PEFT's fp32 adapters) is rounded by lora_gemm, in the kernel where that is free
        s_in = s_act if _tma_rows(s_act) else s_act.to(torch.bfloat16)
        return gluon_base_expand(x, weight, bias, s_in, lora_b, scale, out_dtype)
    return _tl.base_expand(x, weight, bias, s_act, lora_b, scale, out_dtype)


def dx(dy: torch.Tensor, weight: torch.Tensor | None, ds: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor,
       p: float, out_dtype: torch.dtype, *, keep_bits: torch.Tensor | None = None) -> torch.Tensor:
    """``kernels.dx``, in Gluon where ``gluon_applies`` (then the mask comes from ``keep_bits``)."""
    if gluon_applies("dx", a=dy, weight=weight, low=ds, right=lora_a, out_dtype=out_dtype, p=p, keep_bits=keep_bits):
        from .lora_gemm import dx as gluon_dx

        return gluon_dx(dy, weight, ds, lora_a, p, out_dtype, keep_bits=keep_bits)
    return _tl.dx(dy, weight, ds, lora_a, seed, p, out_dtype, keep_bits=keep_bits)

