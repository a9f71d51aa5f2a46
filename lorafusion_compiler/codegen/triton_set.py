"""The ``"triton"`` kernel set: the generated Triton kernels (``kernels``), with the mask-free shrink,
dA and dS/dB products as cuBLAS matmuls where ``dense_products.applies`` (p = 0 at larger ranks, where
cuBLAS is measured faster). Signatures: ``lorafusion_compiler.ops.reference``."""

from __future__ import annotations

import torch

from . import dense_products as _dense
from . import kernels as _tl
from ..ops.dropout_mask import one_bits_role, write_keep_bits
from .kernels import base_expand, dx
from .multi import multi_backward, multi_forward

__all__ = ["base_expand", "da", "ds_db", "dx", "multi_backward", "multi_forward", "saves_keep_bits", "shrink"]


def saves_keep_bits(x: torch.Tensor, lora_a: torch.Tensor, p: float, *, deterministic: bool = False) -> bool:
    """``reference.saves_keep_bits``: never for this set (its dA regenerates the mask as fast as it would
    read bits, ``docs/kernel-notes/dropout-mask.md``, fifteenth session)."""
    return False


def shrink(x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, p: float, *,
           deterministic: bool = False, keep_bits: torch.Tensor | None = None) -> torch.Tensor:
    """``kernels.shrink`` (deterministic either way), a cuBLAS matmul where ``dense_products.applies``;
    ``keep_bits`` are written in torch (``dropout_mask.write_keep_bits``; the Gluon set's fallback)."""
    if keep_bits is not None:
        write_keep_bits(keep_bits, seed, p)
    if _dense.applies("shrink", activations=x, rank=lora_a.shape[0], p=p):
        return _dense.shrink(x, lora_a)
    return _tl.shrink(x, lora_a, seed, p, deterministic=deterministic)


def ds_db(dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor, scale: float, *,
          deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.ds_db``, two cuBLAS matmuls where ``dense_products.applies`` (deterministic: no atomics)."""
    if _dense.applies("ds_db", activations=dy, rank=lora_b.shape[1]):
        return _dense.ds_db(dy, lora_b, s_act, scale)
    return _tl.ds_db(dy, lora_b, s_act, scale, deterministic=deterministic)


def da(x: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor, p: float, a_dtype: torch.dtype, *,
       deterministic: bool = False, keep_bits: torch.Tensor | None = None,
       stored_bits: torch.Tensor | None = None) -> torch.Tensor:
    """``kernels.da``, a cuBLAS matmul where ``dense_products.applies`` (p = 0: no keep bits to write). With
    ``stored_bits`` (the mask shrink stored) the ``tl`` kernel still regenerates the mask from ``seed``:
    the same mask, as fast as reading the bits there."""
    one_bits_role(keep_bits, stored_bits)
    if _dense.applies("da", activations=x, rank=ds.shape[1], p=p):
        return _dense.da(x, ds, a_dtype)
    return _tl.da(x, ds, seed, p, a_dtype, deterministic=deterministic, keep_bits=keep_bits)

