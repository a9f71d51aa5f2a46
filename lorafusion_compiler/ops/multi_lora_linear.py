"""``torch.ops.lorafusion.multi_lora_linear``: many LoRA adapters on one frozen base, one op.

Rows of x [M, K] are routed by ``adapter_rows`` [n, 2] (int64: start row, row count per
adapter): adapter i owns rows ``start_i .. start_i + count_i - 1`` (ranges do not overlap;
rows owned by nobody — padding — get the base layer only). For the rows of adapter i:

    y = x Wᵀ + bias + s_i · (dropout_{p_i}(x) A_iᵀ) B_iᵀ

The dropout mask of adapter i is ``keep_mask(seed_i, p_i, count_i, K)`` over the adapter's
own rows (offsets counted from ``start_i``), so an adapter sees the same mask as when it is
trained alone on those rows with the same seed. Saved for backward: x, S [M, max rank]
(row m holds the r_i values of its adapter) and the seeds [n].

With ``kernels="torch"`` the op loops over adapters and calls the single-adapter reference
kernels on each adapter's rows (the mLoRA-style reference); ``"triton"`` runs the fused
multi-adapter kernels (one launch per kernel for all adapters).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernel_set import get_kernel_set
from .lora_linear import check_lora_inputs

__all__ = ["multi_lora_linear", "multi_lora_linear_backward", "check_multi_inputs", "unpack_grads"]


def check_multi_inputs(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scales: list[float],
    dropout_ps: list[float],
    adapter_rows: Tensor,
) -> None:
    """Raise ValueError naming the bad value when adapters, tables or shapes do not fit."""
    n = len(lora_a)
    if n == 0:
        raise ValueError("multi_lora_linear needs at least one adapter")
    if not (len(lora_b) == len(scales) == len(dropout_ps) == n):
        raise ValueError(f"{n} lora_a matrices but {len(lora_b)} lora_b, {len(scales)} scales, {len(dropout_ps)} dropout_ps")
    if tuple(adapter_rows.shape) != (n, 2) or adapter_rows.dtype != torch.int64:
        raise ValueError(f"adapter_rows must be int64 of shape ({n}, 2) (start, count per adapter), got {adapter_rows.dtype} {tuple(adapter_rows.shape)}")
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        try:
            check_lora_inputs(x, weight, bias, a, b, dropout_ps[i])
        except ValueError as error:
            raise ValueError(f"adapter {i}: {error}") from None
    if len({b.shape[0] for b in lora_b}) != 1 or len({a.dtype for a in lora_a}) != 1:
        raise ValueError("all adapters must have the same out_features and dtype")


def _row_ranges(adapter_rows: Tensor, total_rows: int) -> list[tuple[int, int]]:
    """Host copy of the routing table, checked against the number of rows (reference path only)."""
    ranges = [(int(s), int(c)) for s, c in adapter_rows.tolist()]
    ends = sorted((s, s + c, i) for i, (s, c) in enumerate(ranges))
    previous_end = 0
    for start, end, i in ends:
        if start < previous_end or end > total_rows or end < start:
            raise ValueError(f"adapter {i} rows [{start}, {end}) overlap another adapter or leave the {total_rows} rows of x")
        previous_end = end
    return ranges


def _torch_forward(x2, weight, bias, lora_a, lora_b, scales, dropout_ps, ranges, seeds, out_dtype):
    """Per-adapter loop over the single-adapter reference kernels; the base GEMM runs once for all rows."""
    ref = get_kernel_set("torch")
    max_rank = max(a.shape[0] for a in lora_a)
    s_act = x2.new_zeros(x2.shape[0], max_rank, dtype=lora_a[0].dtype)
    base = torch.nn.functional.linear(x2, weight, bias) if weight is not None else None
    if base is not None:
        y = base.to(out_dtype)
    else:
        y = x2.new_zeros(x2.shape[0], lora_b[0].shape[0], dtype=out_dtype)
    for i, (start, count) in enumerate(ranges):
        if count == 0:
            continue
        rows = slice(start, start + count)
        s_i = ref.shrink(x2[rows], lora_a[i], seeds[i], dropout_ps[i])
        s_act[rows, : s_i.shape[1]] = s_i
        delta = ref.base_expand(x2[rows], None, None, s_i, lora_b[i], scales[i], lora_b[i].dtype)
        y[rows] = (delta if base is None else base[rows] + delta).to(out_dtype)
    return y, s_act


def _new_seeds(x: Tensor, dropout_ps: list[float]) -> Tensor:
    """One fresh int64 seed per adapter from torch's RNG (device-side, no host sync)."""
    if not any(dropout_ps):  # seeds unused: no kernel launch to fill them
        return torch.empty(len(dropout_ps), dtype=torch.int64, device=x.device)
    return torch.randint(0, 2**62, (len(dropout_ps),), dtype=torch.int64, device=x.device)


@torch.library.custom_op("lorafusion::multi_lora_linear", mutates_args=())
def multi_lora_linear(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scales: list[float],
    dropout_ps: list[float],
    adapter_rows: Tensor,
    out_dtype: torch.dtype,
    kernels: str,
    deterministic: bool,
    routing: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Routed multi-adapter LoRA linear; returns (y [..., N], S [M, max rank], seeds [n]).

    ``routing``: the packed piece tables of ``torch.ops.lorafusion.multi_routing(adapter_rows, x)``,
    built once per batch and shared by every layer, or None (the fused kernels then build them
    per call; the torch path never reads them).
    """
    check_multi_inputs(x, weight, bias, lora_a, lora_b, scales, dropout_ps, adapter_rows)
    x2 = x.reshape(-1, x.shape[-1])
    seeds = _new_seeds(x, dropout_ps)
    if kernels == "torch":
        ranges = _row_ranges(adapter_rows, x2.shape[0])
        y, s_act = _torch_forward(x2, weight, bias, lora_a, lora_b, scales, dropout_ps, ranges, seeds, out_dtype)
    else:
        impl = get_kernel_set(kernels)
        y, s_act = impl.multi_forward(x2, weight, bias, lora_a, lora_b, scales, dropout_ps, adapter_rows, seeds, out_dtype,
                                      routing=routing)
    return y.reshape(*x.shape[:-1], y.shape[-1]), s_act, seeds


@multi_lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, dropout_ps, adapter_rows, out_dtype, kernels, deterministic, routing):
    check_multi_inputs(x, weight, bias, lora_a, lora_b, scales, dropout_ps, adapter_rows)
    m = x.numel() // x.shape[-1]
    y = x.new_empty(*x.shape[:-1], lora_b[0].shape[0], dtype=out_dtype)
    s_act = lora_a[0].new_empty(m, max(a.shape[0] for a in lora_a))
    return y, s_act, x.new_empty(len(lora_a), dtype=torch.int64)


def unpack_grads(packed: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Views of a packed gradient buffer (flattened gradients in order) shaped like ``like``."""
    views, offset = [], 0
    for t in like:
        views.append(packed[offset: offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


@torch.library.custom_op("lorafusion::multi_lora_linear_backward", mutates_args=())
def multi_lora_linear_backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    s_act: Tensor,
    seeds: Tensor,
    adapter_rows: Tensor,
    scales: list[float],
    dropout_ps: list[float],
    needs_dx: bool,
    kernels: str,
    deterministic: bool,
    routing: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dX [..., K] or empty, packed dA, packed dB): every adapter's gradient flattened, in
    adapter order, in the adapters' dtype (``unpack_grads`` gives the per-adapter views; outputs of
    a custom op may not alias each other, so the views are made outside). Adapters without rows
    get zero gradients."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if kernels != "torch":
        impl = get_kernel_set(kernels)
        d_x, d_a, d_b = impl.multi_backward(
            dy2, x2, weight, lora_a, lora_b, s_act, seeds, adapter_rows, scales, dropout_ps, needs_dx,
            deterministic=deterministic, routing=routing,
        )
        d_x = d_x.reshape(x.shape) if needs_dx else x.new_empty(0)
        return d_x, d_a.to(lora_a[0].dtype), d_b.to(lora_b[0].dtype)
    ref = get_kernel_set("torch")
    ranges = _row_ranges(adapter_rows, x2.shape[0])
    d_a = [torch.zeros_like(a) for a in lora_a]
    d_b = [torch.zeros_like(b) for b in lora_b]
    d_x = (dy2.to(weight.dtype) @ weight).to(x.dtype) if weight is not None else torch.zeros_like(x2)
    for i, (start, count) in enumerate(ranges):
        if count == 0:
            continue
        rows = slice(start, start + count)
        s_i = s_act[rows, : lora_a[i].shape[0]]
        ds, d_b[i] = ref.ds_db(dy2[rows], lora_b[i], s_i, scales[i])
        d_a[i] = ref.da(x2[rows], ds, seeds[i], dropout_ps[i], lora_a[i].dtype)
        if needs_dx:
            d_x[rows] += ref.dx(dy2[rows], None, ds, lora_a[i], seeds[i], dropout_ps[i], x.dtype)
    packed_a = torch.cat([g.reshape(-1).to(lora_a[0].dtype) for g in d_a])
    packed_b = torch.cat([g.reshape(-1).to(lora_b[0].dtype) for g in d_b])
    return (d_x.reshape(x.shape) if needs_dx else x.new_empty(0)), packed_a, packed_b


@multi_lora_linear_backward.register_fake
def _(dy, x, weight, lora_a, lora_b, s_act, seeds, adapter_rows, scales, dropout_ps, needs_dx, kernels, deterministic,
      routing):
    d_x = torch.empty_like(x) if needs_dx else x.new_empty(0)
    return d_x, lora_a[0].new_empty(sum(a.numel() for a in lora_a)), lora_b[0].new_empty(sum(b.numel() for b in lora_b))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_a, lora_b, scales, dropout_ps, adapter_rows, _out_dtype, kernels, deterministic, routing = inputs
    _y, s_act, seeds = output
    ctx.save_for_backward(x, weight, adapter_rows, routing, s_act, seeds, *lora_a, *lora_b)
    ctx.options = (len(lora_a), scales, dropout_ps, kernels, deterministic)
    ctx.set_materialize_grads(False)  # S and the seeds get no gradients: no zero fills for them


def _backward(ctx, dy, _ds_act, _dseeds):
    n, scales, dropout_ps, kernels, deterministic = ctx.options
    x, weight, adapter_rows, routing, s_act, seeds, *adapters = ctx.saved_tensors
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("lorafusion.multi_lora_linear treats the base weight and bias as frozen, but one requires grad")
    needs_dx = ctx.needs_input_grad[0]
    if dy is None:  # y was not used: every gradient is zero
        d_x, d_a, d_b = None, [None] * n, [None] * n
    else:
        d_x, d_a, d_b = multi_lora_linear_backward(
            dy, x, weight, adapters[:n], adapters[n:], s_act, seeds, adapter_rows, scales, dropout_ps, needs_dx,
            kernels, deterministic, routing,
        )
        d_a, d_b = unpack_grads(d_a, adapters[:n]), unpack_grads(d_b, adapters[n:])
    return (d_x if needs_dx else None), None, None, d_a, d_b, None, None, None, None, None, None, None


multi_lora_linear.register_autograd(_backward, setup_context=_setup_context)
