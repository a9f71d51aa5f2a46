"""The ``"gluon-gemms"`` kernel set (``options={"kernels": "gluon-gemms"}``): the ``"gluon"`` set with its
two fused GEMMs, ``base_expand`` and ``dx``, also in Gluon, by the warp-specialised ping-pong kernels of
``lora_gemm``, wherever ``gluon_applies``; the ``"triton"`` set's elsewhere.

Per call on a cool GPU these GEMMs are the fastest we have (H200: 0.99–1.00× cuBLAS, against 1.01–1.30×
for the ``tl`` ones; ``benchmarks/gemm_check.py``). Under sustained load they are not: an H200 running a
training step sits at its 700 W cap, where a kernel's time is its energy ÷ the cap, and at 4096 tokens
(LLaMa-8B shapes, ``benchmarks/power.py gemms``) base_expand took up to 6% more energy than the ``tl`` one and
dX from 6% more (a long reduction) to 14% less (k/v with keep bits); the training step ran 0.933× the floor
with them against 0.954× with the ``tl`` ones (BENCHMARKS.md, twenty-second session). So ``"auto"`` picks
``"gluon"``, and this set is for runs whose GPU stays below its power cap (short bursts, lighter steps):
measure both there (``benchmarks/e2e.py --sustained``).

Gluon applies to a GEMM when it runs on a Hopper GPU with non-empty activations, weight and output in
bfloat16 and the adapters in bfloat16 or float32 (rounded to bf16 first, as the Triton kernels round
them), row-major with sizes that are multiples of 8, a rank in ``lora_gemm.SUPPORTED_RANKS``, a weight
given, and (dx) the dropout mask given as keep bits when p > 0, with a ring still
``lora_gemm.MIN_DX_STAGES`` deep beside them (not at r = 64).
"""

from __future__ import annotations

import torch

from .. import triton_set as _tl
from ..kernels import _tma_rows
from .kernel_set import _ADAPTER_DTYPES, _hopper, da, ds_db, multi_backward, multi_forward, saves_keep_bits, shrink

__all__ = ["base_expand", "da", "ds_db", "dx", "gluon_applies", "multi_backward", "multi_forward", "saves_keep_bits",
           "shrink"]


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

