"""``torch.ops.lorafusion.lora_linear_shared``: LoRA layers without dropout that read one input.

The q/k/v (and gate/up) projections of a transformer block read the same activation x. Split
per site, the LoRA kernels read x twice per site besides the base GEMM (shrink, dA). When the
sites share x and apply no dropout, their A matrices stack into one ``[Σr, K]`` matrix, so one
shrink and one dA serve them all and x is read once for each instead of once per site:

    forward   S = x [A_1; ...; A_G]ᵀ                       one shrink,     S [M, Σr]
              y_i = x W_iᵀ + b_i + s_i · S_i B_iᵀ           one base_expand per site (S_i: S's columns of site i)
    backward  dS_i, dB_i from one pass over dY_i             one ds_db per site
              [dA_1; ...; dA_G] = [dS_1 ... dS_G]ᵀ x        one dA (``overlap_backward``: beside the dX GEMMs)
              dX = Σ_i dY_i W_i + dS_i A_i                  one dx per site; the sum is left to the
                                                            traced backward graph (outside this op), so
                                                            Inductor fuses it into dX's consumer as it
                                                            does for separate sites

Saved for backward: x and S only. With dropout every site draws its own mask, which this op
does not do (such sites stay separate ``lora_linear`` ops).
"""

from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
from torch import Tensor

from .kernel_set import get_kernel_set
from .lora_linear import _new_seed, check_lora_inputs, _pad_grads
from .reference import s_dtype
from .side_stream import beside, side_stream

__all__ = ["lora_linear_shared", "lora_linear_shared_backward"]


def _check_shared(x: Tensor, weights, biases, lora_as, lora_bs, scales) -> None:
    """ValueError naming the bad value when the sites cannot share one op."""
    g = len(lora_as)
    if g == 0 or not len(weights) == len(biases) == len(lora_bs) == len(scales) == g:
        raise ValueError(f"lora_linear_shared needs one weight, bias, lora_a, lora_b and scale per site, got "
                         f"{len(weights)}, {len(biases)}, {g}, {len(lora_bs)}, {len(scales)}")
    for i in range(g):
        check_lora_inputs(x, weights[i], biases[i], lora_as[i], lora_bs[i], 0.0)
        if lora_as[i].dtype != lora_as[0].dtype:
            raise ValueError(f"site {i} has {lora_as[i].dtype} adapters but site 0 has {lora_as[0].dtype}; "
                             "sites sharing one op need one adapter dtype")


@torch.library.custom_op("lorafusion::lora_linear_shared", mutates_args=())
def lora_linear_shared(
    x: Tensor,
    weights: list[Optional[Tensor]],
    biases: list[Optional[Tensor]],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    scales: list[float],
    out_dtype: torch.dtype,
    kernels: str,
    deterministic: bool,
    overlap_backward: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """y_i = x W_iᵀ + b_i + s_i·(x A_iᵀ) B_iᵀ for G sites reading x [..., K]; returns ([y_i [..., N_i]], S [M, Σr])."""
    _check_shared(x, weights, biases, lora_as, lora_bs, scales)
    impl = get_kernel_set(kernels)
    x2 = x.reshape(-1, x.shape[-1])
    s_all = impl.shrink(x2, torch.cat(lora_as), _new_seed(x, 0.0), 0.0, deterministic=deterministic)
    s_sites = s_all.split([a.shape[0] for a in lora_as], dim=1)
    ys = [impl.base_expand(x2, w, b, s_i, lb, s, out_dtype).reshape(*x.shape[:-1], lb.shape[0])
          for w, b, s_i, lb, s in zip(weights, biases, s_sites, lora_bs, scales)]
    return ys, s_all


@lora_linear_shared.register_fake
def _(x, weights, biases, lora_as, lora_bs, scales, out_dtype, kernels, deterministic, overlap_backward=False):
    _check_shared(x, weights, biases, lora_as, lora_bs, scales)
    ys = [x.new_empty(*x.shape[:-1], lb.shape[0], dtype=out_dtype) for lb in lora_bs]
    return ys, lora_as[0].new_empty(x.numel() // x.shape[-1], sum(a.shape[0] for a in lora_as),
                                    dtype=s_dtype(lora_as[0].dtype))


@torch.library.custom_op("lorafusion::lora_linear_shared_backward", mutates_args=())
def lora_linear_shared_backward(
    dys: list[Tensor],
    x: Tensor,
    weights: list[Optional[Tensor]],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    s_all: Tensor,
    scales: list[float],
    needs_dx: bool,
    kernels: str,
    deterministic: bool,
    overlap_backward: bool = False,
) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """Returns ([dX_i [..., K]] (site i's share of dX; none when ``needs_dx`` is False), [dA_1; ...; dA_G]
    [Σr, K], [dB_i])."""
    impl = get_kernel_set(kernels)
    x2 = x.reshape(-1, x.shape[-1])
    seed = _new_seed(x, 0.0)
    s_sites = s_all.split([lb.shape[1] for lb in lora_bs], dim=1)
    d_s, d_b = [], []
    for dy, lb, s_i, s in zip(dys, lora_bs, s_sites, scales):
        ds_i, db_i = impl.ds_db(dy.reshape(-1, dy.shape[-1]), lb, s_i, s, deterministic=deterministic)
        d_s.append(ds_i)
        d_b.append(db_i)
    d_a, d_xs = beside(
        side_stream(x.device) if needs_dx and overlap_backward else None,  # on a GPU: dA beside the dX GEMMs
        lambda: impl.da(x2, torch.cat(d_s, dim=1), seed, 0.0, lora_as[0].dtype, deterministic=deterministic),
        lambda: [impl.dx(dy.reshape(-1, dy.shape[-1]), w, ds_i, a, seed, 0.0, x.dtype).reshape(x.shape)
                 for dy, w, a, ds_i in zip(dys, weights, lora_as, d_s)] if needs_dx else [],
    )
    return d_xs, d_a, d_b


@lora_linear_shared_backward.register_fake
def _(dys, x, weights, lora_as, lora_bs, s_all, scales, needs_dx, kernels, deterministic, overlap_backward=False):
    d_xs = [torch.empty_like(x) for _ in lora_as] if needs_dx else []
    d_a = lora_as[0].new_empty(sum(a.shape[0] for a in lora_as), x.shape[-1])
    return d_xs, d_a, [torch.empty_like(lb) for lb in lora_bs]


def _setup_context(ctx, inputs, output) -> None:
    x, weights, biases, lora_as, lora_bs, scales, _out_dtype, kernels, deterministic, overlap_backward = inputs
    _ys, s_all = output
    ctx.save_for_backward(x, s_all, *weights, *lora_as, *lora_bs)
    ctx.options = (len(lora_as), scales, kernels, deterministic, overlap_backward)
    ctx.frozen_grads = (_no_grads(weights), _no_grads(biases))


def _no_grads(operands: list[Optional[Tensor]]) -> Optional[list[None]]:
    """The gradient slot of a frozen list input: autograd takes a list holding only tensors as a
    list of inputs (one None each) and a list with a None in it as one input (one None)."""
    return [None] * len(operands) if all(isinstance(t, Tensor) for t in operands) else None


def _any_true(flags) -> bool:
    """``ctx.needs_input_grad`` entry of a list input: a list of bools, or one bool."""
    return any(flags) if isinstance(flags, (list, tuple)) else bool(flags)


def _backward(ctx, d_ys, _d_s_all):
    g, scales, kernels, deterministic, overlap_backward = ctx.options
    x, s_all, *rest = ctx.saved_tensors
    weights, lora_as, lora_bs = rest[:g], rest[g:2 * g], rest[2 * g:]
    needs = ctx.needs_input_grad
    if _any_true(needs[1]) or _any_true(needs[2]):
        raise RuntimeError(
            "lorafusion.lora_linear_shared treats the base weights and biases as frozen, but one of them requires "
            "grad; call weight.requires_grad_(False) (and bias) or leave these layers uncompiled"
        )
    d_ys = [torch.zeros(*x.shape[:-1], lb.shape[0], dtype=x.dtype, device=x.device) if d is None else d
            for d, lb in zip(d_ys, lora_bs)]
    d_xs, d_a, d_b = lora_linear_shared_backward(
        d_ys, x, list(weights), list(lora_as), list(lora_bs), s_all, scales, needs[0], kernels, deterministic,
        overlap_backward,
    )
    # summed here, in the traced graph: inside the op the sum was G-1 eager adds that Inductor could
    # not fuse (H100 e2e profile: +0.78 ms per step at 8 layers, docs/kernel-notes/split-kernels.md)
    d_x = functools.reduce(operator.add, d_xs) if needs[0] else None
    d_as = list(d_a.split([a.shape[0] for a in lora_as]))
    return _pad_grads(ctx, d_x, *ctx.frozen_grads, d_as, d_b)


lora_linear_shared.register_autograd(_backward, setup_context=_setup_context)
