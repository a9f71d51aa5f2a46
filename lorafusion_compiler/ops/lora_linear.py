"""``torch.ops.lorafusion.lora_linear``: a LoRA linear layer split at the rank r.

Forward  (two kernels):  S = dropout(x) Aᵀ;   y = x Wᵀ + bias + s·S Bᵀ.
Backward (three kernels): dS, dB from one pass over dY;  dA = dSᵀ x̃;
                          dX = dY W + m ⊙ (dS A)/(1-p)  (``overlap_backward``: on a GPU
                          dA runs beside dX on a second stream, ``side_stream``).
Saved for backward: x, S [M,r], the int64 dropout seed — never x̃ — and, where the kernel set
stores the mask in the forward (``saves_keep_bits``: the Gluon set at p > 0), its keep bits
(uint8 [M, K/8], M·K/8 bytes): then the mask is computed once per step, by shrink, and dA and dX
read it.

The op owns its autograd (``register_autograd``), so AOTAutograd and Inductor treat it
as one opaque node in the forward and one in the backward graph. Which code computes
the five kernels is chosen by the ``kernels`` argument, one of ``kernel_set.KERNEL_SETS``:
``"torch"`` (``reference``), ``"triton"`` (``lorafusion_compiler.codegen``), or the Gluon sets
``"gluon"`` and ``"gluon-gemms"`` (``lorafusion_compiler.codegen.gluon``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dropout_mask import drop_threshold, new_keep_bits
from .kernel_set import get_kernel_set
from .reference import s_dtype
from .side_stream import beside, side_stream

__all__ = ["lora_linear", "lora_linear_backward", "check_lora_inputs"]


def check_lora_inputs(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, dropout_p: float
) -> None:
    """Raise ValueError naming the offending value when the operands do not fit together."""
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"lora_a and lora_b must be 2-D, got shapes {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    rank, in_features = lora_a.shape
    if rank == 0:
        raise ValueError("LoRA rank is 0 (lora_a has shape (0, K)); use rank >= 1 or drop the adapter")
    if lora_b.shape[1] != rank:
        raise ValueError(f"rank mismatch: lora_a has rank {rank} (shape {tuple(lora_a.shape)}) but lora_b has shape {tuple(lora_b.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but lora_a expects {in_features}")
    out_features = lora_b.shape[0]
    if weight is not None and tuple(weight.shape) != (out_features, in_features):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({out_features}, {in_features}) from lora_b/lora_a")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    if bias is not None and weight is None:
        raise ValueError("bias given without weight")
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and not t.dtype.is_floating_point:
            raise ValueError(f"{name} has dtype {t.dtype}; a floating-point dtype is required")
    if lora_a.dtype != lora_b.dtype:
        raise ValueError(f"lora_a is {lora_a.dtype} but lora_b is {lora_b.dtype}; cast both adapter matrices to one dtype")
    if weight is not None and weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}; the base layer must see its own dtype")
    drop_threshold(dropout_p)


def _new_bits(x2: Tensor, lora_a: Tensor, dropout_p: float, kernels: str, deterministic: bool) -> Tensor:
    """The (uninitialised) keep bits the forward returns for x as [M, K]: uint8 [M, K/8] where the kernel set
    saves them (``saves_keep_bits``), else [0, 0] (none saved)."""
    saves = get_kernel_set(kernels).saves_keep_bits(x2, lora_a, dropout_p, deterministic=deterministic)
    shape = (x2.shape[0], x2.shape[1] // 8) if saves else (0, 0)
    return x2.new_empty(shape, dtype=torch.uint8)


def _new_seed(x: Tensor, dropout_p: float) -> Tensor:
    """A fresh int64 seed on x's device drawn from torch's RNG (no host sync); unused (and not
    initialised: no kernel launch) when p == 0."""
    if dropout_p == 0.0:
        return torch.empty((), dtype=torch.int64, device=x.device)
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)


@torch.library.custom_op("lorafusion::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float,
    out_dtype: torch.dtype,
    kernels: str,
    deterministic: bool,
    overlap_backward: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = x Wᵀ + bias + scale·(dropout(x) Aᵀ) Bᵀ for x [..., K]; returns (y [..., N], S [M, r] in
    ``reference.s_dtype(A.dtype)``, seed [], keep bits uint8 [M, K/8] or [0, 0] where the kernel set
    does not save the mask).
    ``overlap_backward`` is for the backward: on a GPU its dA runs beside dX on a second stream."""
    check_lora_inputs(x, weight, bias, lora_a, lora_b, dropout_p)
    impl = get_kernel_set(kernels)
    x2 = x.reshape(-1, x.shape[-1])
    seed = _new_seed(x, dropout_p)
    bits = _new_bits(x2, lora_a, dropout_p, kernels, deterministic)
    s_act = impl.shrink(x2, lora_a, seed, dropout_p, deterministic=deterministic,
                        keep_bits=bits if bits.shape[1] else None)
    y = impl.base_expand(x2, weight, bias, s_act, lora_b, scale, out_dtype)
    return y.reshape(*x.shape[:-1], lora_b.shape[0]), s_act, seed, bits


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, out_dtype, kernels, deterministic, overlap_backward=False):
    check_lora_inputs(x, weight, bias, lora_a, lora_b, dropout_p)
    m = x.numel() // x.shape[-1]
    y = x.new_empty(*x.shape[:-1], lora_b.shape[0], dtype=out_dtype)
    bits = _new_bits(x.reshape(-1, x.shape[-1]), lora_a, dropout_p, kernels, deterministic)
    return (y, lora_a.new_empty(m, lora_a.shape[0], dtype=s_dtype(lora_a.dtype)), x.new_empty((), dtype=torch.int64),
            bits)


@torch.library.custom_op("lorafusion::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    s_act: Tensor,
    seed: Tensor,
    keep_bits: Tensor,
    scale: float,
    dropout_p: float,
    needs_dx: bool,
    kernels: str,
    deterministic: bool,
    overlap_backward: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dX [..., K] or an empty tensor when ``needs_dx`` is False, dA [r,K], dB [N,r]).
    ``keep_bits``: the forward's (uint8 [M, K/8], or [0, 0] when it saved none).
    ``overlap_backward``: on a GPU dA runs on a second stream beside dX (``side_stream``)."""
    impl = get_kernel_set(kernels)
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    ds, d_b = impl.ds_db(dy2, lora_b, s_act, scale, deterministic=deterministic)
    stored = keep_bits if keep_bits.shape[1] else None
    # dA beside dX (side_stream.py): dX regenerates the mask (or reads the stored bits); dA then dX on one
    # stream: dA hands its regenerated mask to dX as keep bits, unless the forward stored them
    stream = side_stream(x.device) if needs_dx and overlap_backward else None
    bits = new_keep_bits(x2, dropout_p, lora_a.shape[0]) if needs_dx and stream is None and stored is None else None
    d_a, d_x = beside(
        stream,
        lambda: impl.da(x2, ds, seed, dropout_p, lora_a.dtype, deterministic=deterministic, keep_bits=bits,
                        stored_bits=stored),
        lambda: impl.dx(dy2, weight, ds, lora_a, seed, dropout_p, x.dtype,
                        keep_bits=stored if stored is not None else bits) if needs_dx else None,
    )
    return (d_x.reshape(x.shape) if needs_dx else x.new_empty(0)), d_a, d_b


@lora_linear_backward.register_fake
def _(dy, x, weight, lora_a, lora_b, s_act, seed, keep_bits, scale, dropout_p, needs_dx, kernels, deterministic,
      overlap_backward=False):
    d_x = torch.empty_like(x) if needs_dx else x.new_empty(0)
    return d_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_a, lora_b, scale, dropout_p, _out_dtype, kernels, deterministic, overlap_backward = inputs
    _y, s_act, seed, keep_bits = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s_act, seed, keep_bits)
    ctx.options = (scale, dropout_p, kernels, deterministic, overlap_backward)
    # S, the seed and the keep bits never receive gradients: without this autograd would fill a zero tensor
    # for each (kernel launches per backward when the op runs eagerly)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _ds_act, _dseed, _dbits):
    x, weight, lora_a, lora_b, s_act, seed, keep_bits = ctx.saved_tensors
    scale, dropout_p, kernels, deterministic, overlap_backward = ctx.options
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError(
            "lorafusion.lora_linear treats the base weight and bias as frozen, but one of them requires grad; "
            "call weight.requires_grad_(False) (and bias) or leave this layer uncompiled"
        )
    if dy is None:  # y was not used: every gradient is zero
        return _pad_grads(ctx)
    needs_dx = ctx.needs_input_grad[0]
    d_x, d_a, d_b = lora_linear_backward(
        dy, x, weight, lora_a, lora_b, s_act, seed, keep_bits, scale, dropout_p, needs_dx, kernels, deterministic,
        overlap_backward,
    )
    return _pad_grads(ctx, (d_x if needs_dx else None), None, None, d_a, d_b)


def _pad_grads(ctx, *grads):
    """``grads`` then one None per remaining input that autograd saw: the dispatcher drops trailing
    arguments equal to their defaults (``overlap_backward=False``), so their number varies."""
    return *grads, *[None] * (len(ctx.needs_input_grad) - len(grads))


lora_linear.register_autograd(_backward, setup_context=_setup_context)
