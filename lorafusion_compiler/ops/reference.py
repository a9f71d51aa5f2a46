"""The five split-at-r LoRA kernels written as plain torch code.

This is the CPU implementation and the reference every Triton kernel is tested
against. Notation (see ``shared/notes/kernel-design.md``): x [M,K], W [N,K], bias [N],
A [r,K], B [N,r], scale s, dropout p with keep-mask m (``dropout_mask.keep_mask``),
x̃ = m ⊙ x / (1-p), S = x̃ Aᵀ [M,r].

Dtypes follow eager PEFT: the adapter path runs in the adapter's dtype (``A.dtype``),
the base path in x's dtype, and the sum is cast to ``out_dtype``. S is handed on in ``s_dtype(A.dtype)``
(float32 unless A is float64), the dtype the GPU kernels accumulate it in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout_mask import keep_mask, one_bits_role, pack_keep_bits, unpack_keep_bits

__all__ = ["dropped_input", "s_dtype", "saves_keep_bits", "shrink", "base_expand", "ds_db", "da", "dx"]


def s_dtype(adapter_dtype: torch.dtype) -> torch.dtype:
    """dtype of S = x̃ Aᵀ as ``shrink`` returns it (and the op saves it): float32 for 16-bit and float32
    adapters (the kernels' fp32 sums, stored without a cast), float64 for float64 ones."""
    return torch.promote_types(adapter_dtype, torch.float32)


def dropped_input(x: torch.Tensor, seed: torch.Tensor, p: float, dtype: torch.dtype, *,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """x̃ = m ⊙ x / (1-p) in ``dtype``; ``x`` is [M,K]; ``mask``: m if already generated."""
    xd = x.to(dtype)
    if p == 0.0:
        return xd
    if mask is None:
        mask = keep_mask(seed, p, xd.shape[0], xd.shape[1], device=xd.device)
    return xd * mask.to(dtype) * (1.0 / (1.0 - p))


def saves_keep_bits(x: torch.Tensor, lora_a: torch.Tensor, p: float, *, deterministic: bool = False) -> bool:
    """Whether the op has ``shrink`` store the mask as keep bits and saves them for ``da`` and ``dx``
    (``dropout_mask``) instead of regenerating it there: never for this set (torch regenerates it cheaply).
    A set decides from shapes, dtypes and devices only: the op also asks with fake tensors."""
    return False


def shrink(x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, p: float, *,
           deterministic: bool = False, keep_bits: torch.Tensor | None = None) -> torch.Tensor:
    """S = dropout(x) Aᵀ: x [M,K], A [r,K] -> S [M,r] in ``s_dtype(A.dtype)`` (computed in A's dtype).
    ``keep_bits`` (``dropout_mask.new_keep_bits``): also written with the keep-mask, for ``da`` and ``dx``.

    torch code is always deterministic; ``deterministic`` (GPU sets: no atomics) exists for the shared signature.
    """
    mask = None
    if keep_bits is not None:
        mask = keep_mask(seed, p, x.shape[0], x.shape[1], device=x.device)
        keep_bits.copy_(pack_keep_bits(mask))
    return F.linear(dropped_input(x, seed, p, lora_a.dtype, mask=mask), lora_a).to(s_dtype(lora_a.dtype))


def base_expand(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    s_act: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y = x Wᵀ + bias + s·S Bᵀ -> [M,N] in ``out_dtype``; without W only the LoRA term."""
    delta = F.linear(s_act.to(lora_b.dtype), lora_b) * scale
    if weight is None:
        return delta.to(out_dtype)
    return (F.linear(x, weight, bias) + delta).to(out_dtype)


def ds_db(
    dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor, scale: float, *, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s·dY B [M,r] and dB = s·dYᵀ S [N,r] (B's dtype) from one read of dY [M,N].

    torch code is always deterministic; ``deterministic`` exists for the shared signature.
    """
    g = dy.to(lora_b.dtype) * scale
    return g @ lora_b, (g.t() @ s_act.to(lora_b.dtype))


def da(
    x: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor, p: float, a_dtype: torch.dtype, *, deterministic: bool = False,
    keep_bits: torch.Tensor | None = None, stored_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """dA = dSᵀ x̃: dS [M,r], x [M,K] -> [r,K] in ``a_dtype`` (``deterministic`` as in ``ds_db``);
    ``keep_bits`` (``dropout_mask.new_keep_bits``): also written with the keep-mask, for ``dx``;
    ``stored_bits``: the keep-mask as ``shrink`` stored it, read instead of regenerated."""
    one_bits_role(keep_bits, stored_bits)
    mask = None
    if stored_bits is not None:
        mask = unpack_keep_bits(stored_bits)
    elif keep_bits is not None:
        mask = keep_mask(seed, p, x.shape[0], x.shape[1], device=x.device)
        keep_bits.copy_(pack_keep_bits(mask))
    return ds.to(a_dtype).t() @ dropped_input(x, seed, p, a_dtype, mask=mask)


def dx(
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    ds: torch.Tensor,
    lora_a: torch.Tensor,
    seed: torch.Tensor,
    p: float,
    out_dtype: torch.dtype,
    *,
    keep_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A)/(1-p) -> [M,K] in ``out_dtype``; without W only the LoRA term.
    ``keep_bits``: the mask as ``da`` wrote it (else regenerated from ``seed``)."""
    lora = ds.to(lora_a.dtype) @ lora_a
    if p != 0.0:
        if keep_bits is not None:
            mask = unpack_keep_bits(keep_bits)
        else:
            mask = keep_mask(seed, p, lora.shape[0], lora.shape[1], device=lora.device)
        lora = lora * mask.to(lora.dtype) * (1.0 / (1.0 - p))
    if weight is None:
        return lora.to(out_dtype)
    return (dy.to(weight.dtype) @ weight + lora).to(out_dtype)
