"""Launchers of the multi-adapter specialisation (``KernelSpec.multi``) of the five kernels.

Routing: rows of x [M, K] are owned by adapters through ``adapter_rows`` [n, 2] (start,
count; one contiguous range per adapter, gaps get the base layer only). The rows are cut
into *pieces* of <= BLOCK_M rows of one adapter (or of none); the piece tables
(``ops.multi_routing``) come packed for every BLOCK_M, built once per batch (``routing``
argument) or here on first use (cached). Empty pieces are skipped by the kernels:

* shrink / ds_db: one program per piece (pieces of no adapter exit at once);
* base_expand / dx: regular BLOCK_M row blocks (the base GEMM is never split); the pieces
  of a row block (found through a per-block index) add their own rows' low-rank terms;
* da: the piece table is cut into chunks of equal piece counts; one program per (column block,
  chunk, adapter) sums the adapter's run inside the chunk into its block of a packed buffer.

Per-adapter parameters live in two small device tables (int64: A/B pointers and row strides,
rank, dropout threshold, dA/dB offsets in the packed gradient buffers; fp32: scale,
1/(1-p)), cached by value, so a steady-state call copies nothing host-to-device. They are
allocated by a helper thread: CUDA-graph trees route every allocation of the warming-up or
recording thread into the graph's memory pool, where a cached tensor counts as a leak. Piece
tables built here are cached per ``adapter_rows`` tensor (weakly, by identity and version).
"""

from __future__ import annotations

import concurrent.futures
import functools
import weakref

import torch

from ..ops.dropout_mask import drop_threshold, new_keep_bits
from ..ops.multi_routing import build_routing, unpack_routing
from .autotune import TileConfig, cdiv, run_tuned
from .kernels import (
    _DTYPE_NAMES,
    _dtype_name,
    _launch,
    _lowrank_gemm,
    _prepare,
    _split,
)
from .render import rank_bucket

__all__ = ["multi_backward", "multi_forward"]

_MAX_ADAPTERS = 256

_ADAPTER_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = {}


def _adapter_tables(lora_a, lora_b, scales, dropout_ps, device):
    """(int64 [n, 12], fp32 [n, 2], dA offsets, dB offsets) for these adapters, cached by value.

    int64 columns: A ptr, A strides (2), B ptr, B strides (2), rank, threshold, dA offset,
    dB offset (elements, in the packed fp32 gradient buffers), unused; fp32: scale, 1/(1-p).
    """
    key = (device, tuple((a.data_ptr(), a.stride(), a.shape[0]) for a in lora_a),
           tuple((b.data_ptr(), b.stride()) for b in lora_b), tuple(map(float, scales)), tuple(map(float, dropout_ps)))
    hit = _ADAPTER_TABLES.get(key)
    if hit is not None:
        return hit
    k = lora_a[0].shape[1]
    n_out = lora_b[0].shape[0]
    rows, da_off, db_off = [], [], []
    oa = ob = 0
    for a, b, p in zip(lora_a, lora_b, dropout_ps):
        r = a.shape[0]
        da_off.append(oa)
        db_off.append(ob)
        rows.append([a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
                     r, drop_threshold(p), oa, ob, 0, 0])
        oa += r * k
        ob += n_out * r
    itab = _to_device(torch.tensor(rows, dtype=torch.int64), device)
    ftab = _to_device(torch.tensor([[float(s), 1.0 / (1.0 - p)] for s, p in zip(scales, dropout_ps)], dtype=torch.float32), device)
    if len(_ADAPTER_TABLES) > 256:
        _ADAPTER_TABLES.clear()
    out = (itab, ftab, da_off + [oa], db_off + [ob])
    _ADAPTER_TABLES[key] = out
    return out


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table`` copied to ``device`` for the cache; on CUDA by a helper thread (module docstring)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():  # in capture: as any host-to-device copy
        return table.to(device)
    return _helper_thread().submit(table.to, device).result()  # synchronous copy: ready when it returns


@functools.cache
def _helper_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafusion-tables")


_ROUTING: dict[int, tuple[weakref.ref, dict]] = {}


def _pieces(adapter_rows: torch.Tensor, m: int, block_m: int, routing: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pieces, blk, spans) for BLOCK_M: views into the packed ``routing`` tensor, which is built
    here when not given (``build_routing``, cached per adapter_rows tensor: identity + version, M).

    During CUDA-graph capture a missing table is built inside the graph (device ops only), so
    a replay follows new routing values written into adapter_rows.
    """
    if routing is None:
        routing = _cached_routing(adapter_rows, m)
    return unpack_routing(routing, m, adapter_rows.shape[0], block_m)


def _cached_routing(adapter_rows: torch.Tensor, m: int) -> torch.Tensor:
    if adapter_rows.is_cuda and torch.cuda.is_current_stream_capturing():
        return build_routing(adapter_rows, m)
    entry = _ROUTING.get(id(adapter_rows))
    if entry is None or entry[0]() is not adapter_rows:
        tid = id(adapter_rows)
        def _drop(ref, tid=tid):
            if tid in _ROUTING and _ROUTING[tid][0] is ref:
                del _ROUTING[tid]
        entry = _ROUTING[tid] = (weakref.ref(adapter_rows, _drop), {})
    per = entry[1]
    key = (adapter_rows._version, m)
    hit = per.get(key)
    if hit is None:
        if len(per) > 16:
            per.clear()
        hit = per[key] = build_routing(adapter_rows, m)
    return hit


def _aligned(mats: list[torch.Tensor]) -> bool:
    """Every (contiguous) matrix starts 16-byte aligned and has rows of a multiple of 8 elements."""
    return all(t.data_ptr() % 16 == 0 and t.shape[1] % 8 == 0 for t in mats)


def _common(x2, lora_a, lora_b, scales, dropout_ps, adapter_rows, seeds):
    """Validate, make every adapter matrix contiguous (the kernels assume column stride 1), and
    return (n, ranks, max rank, rank bucket, adapter_rows on x's device, A list, B list, aligned)."""
    n = len(lora_a)
    if not 1 <= n <= _MAX_ADAPTERS:
        raise ValueError(f"{n} adapters; the multi-adapter kernels take 1..{_MAX_ADAPTERS}")
    if seeds.dtype != torch.int64 or seeds.numel() != n or seeds.device != x2.device:
        raise ValueError(f"seeds must be int64 [{n}] on {x2.device}")
    if adapter_rows.device != x2.device:
        adapter_rows = adapter_rows.to(x2.device)
    ranks = [a.shape[0] for a in lora_a]
    rs = max(ranks)
    if max(t.numel() for t in (*lora_a, *lora_b)) >= 2**31:
        raise ValueError("an adapter matrix has >= 2**31 elements; the multi-adapter kernels index adapters with int32")
    lora_a = [a.contiguous() for a in lora_a]
    lora_b = [b.contiguous() for b in lora_b]
    aligned = _aligned(lora_a) and _aligned(lora_b)
    return n, ranks, rs, rank_bucket(rs), adapter_rows, lora_a, lora_b, aligned


def _gemm(kernel_name, fields, x, weight, bias, low_l, seeds, out, tables, itab, ftab, bits=None):
    """Multi-adapter base_expand / dx: out = x Wm (+bias) + each row's adapter's low-rank term
    (the single-adapter launcher with the routing tables as extra arguments; ``bits``: dx's keep bits)."""

    def route(cfg: TileConfig) -> tuple:
        pieces, blk, _spans = tables(cfg["BLOCK_M"])
        return pieces, blk, itab, ftab

    return _lowrank_gemm(kernel_name, {**fields, "multi": True, "keep_bits": bits is not None}, x, weight, bias, low_l, None,
                         1.0, seeds, 0, out, route=route, bits=bits)


def multi_forward(x2, weight, bias, lora_a, lora_b, scales, dropout_ps, adapter_rows, seeds, out_dtype,
                  *, routing: torch.Tensor | None = None):
    """(y [M, N] in ``out_dtype``, S [M, max rank] in the adapters' dtype) for routed adapters;
    ``routing``: the packed tables of ``ops.multi_routing`` (else built here, cached)."""
    n, ranks, rs, rb, adapter_rows, lora_a, lora_b, aligned = _common(
        x2, lora_a, lora_b, scales, dropout_ps, adapter_rows, seeds)
    m, k = x2.shape
    tables = functools.partial(_pieces, adapter_rows, m, routing=routing)
    n_out = lora_b[0].shape[0]
    dev = x2.device
    itab, ftab, _, _ = _adapter_tables(lora_a, lora_b, scales, dropout_ps, dev)
    a_dtype = lora_a[0].dtype
    dropout = any(p != 0.0 for p in dropout_ps)

    kernel, key, _ = _prepare("shrink", dtype=_dtype_name("x", x2), adapter_dtype=_dtype_name("lora_a", lora_a[0]),
                              dropout=dropout, rank_bucket=rb, aligned8=k % 8 == 0, multi=True,
                              adapters_aligned=aligned)

    def launch_shrink(cfg: TileConfig) -> torch.Tensor:
        pieces, blk, spans = tables(cfg["BLOCK_M"])
        t = pieces.shape[0]
        k_split = _split(cdiv(k, cfg["BLOCK_K"]), cdiv(m, cfg["BLOCK_M"]), dev, cfg)
        out = torch.empty(k_split, m, rs, dtype=a_dtype if k_split == 1 else torch.float32, device=dev)
        _launch(kernel, (t, k_split),
                (x2, lora_a[0], out, seeds, m, k, rs, 0, 1.0, m * rs, *x2.stride(), 0, 0, rs, 1,
                 pieces, blk, itab, ftab),
                cfg, BLOCK_R=rb, K_SPLIT=k_split)
        return out

    s_act = run_tuned("shrink", key, (m, k, n), rb, launch_shrink, operand_bytes=x2.element_size())
    s_act = s_act[0] if s_act.shape[0] == 1 else s_act.sum(0)
    s_act = s_act if s_act.dtype == a_dtype else s_act.to(a_dtype)

    fields = dict(dtype=_dtype_name("x", x2), adapter_dtype=_dtype_name("lora_b", lora_b[0]),
                  has_weight=weight is not None, has_bias=bias is not None, rank_bucket=rb, adapters_aligned=aligned)
    y = torch.empty(m, n_out, dtype=out_dtype, device=dev)
    y = _gemm("base_expand", fields, x2, weight, bias, s_act, seeds, y, tables, itab, ftab)
    return y, s_act


def multi_backward(dy2, x2, weight, lora_a, lora_b, s_act, seeds, adapter_rows, scales, dropout_ps, needs_dx,
                   *, deterministic: bool = False, routing: torch.Tensor | None = None):
    """(dX [M, K] (empty unless ``needs_dx``), packed dA, packed dB): the adapters' gradients
    flattened in adapter order (dA_i [r_i, K], dB_i [N, r_i]; see ``unpack_grads``). dB is fp32;
    dA is fp32 when programs share an adapter's block (atomics), else in the adapters' dtype.
    Adapters without rows get zeros."""
    n, ranks, rs, rb, adapter_rows, lora_a, lora_b, aligned = _common(
        x2, lora_a, lora_b, scales, dropout_ps, adapter_rows, seeds)
    m, k = x2.shape
    tables = functools.partial(_pieces, adapter_rows, m, routing=routing)
    n_out = dy2.shape[1]
    dev = x2.device
    itab, ftab, da_off, db_off = _adapter_tables(lora_a, lora_b, scales, dropout_ps, dev)
    a_dtype = lora_a[0].dtype
    dropout = any(p != 0.0 for p in dropout_ps)
    if s_act.shape != (m, rs):
        raise ValueError(f"s_act has shape {tuple(s_act.shape)}, expected {(m, rs)}")

    # dS and dB
    kernel, key, _ = _prepare("ds_db", dtype=_dtype_name("dy", dy2), adapter_dtype=_dtype_name("lora_b", lora_b[0]),
                              rank_bucket=rb, deterministic=deterministic, multi=True, adapters_aligned=aligned)

    def launch_ds_db(cfg: TileConfig):
        pieces, blk, spans = tables(cfg["BLOCK_M"])
        t = pieces.shape[0]
        n_split = _split(cdiv(n_out, cfg["BLOCK_N"]), cdiv(m, cfg["BLOCK_M"]), dev, cfg)
        if deterministic:
            d_s = torch.empty(n_split, m, rs, dtype=torch.float32, device=dev)
            d_b = torch.zeros(t, n_out, rs, dtype=torch.float32, device=dev)
        else:
            d_s = torch.zeros(1, m, rs, dtype=torch.float32, device=dev)
            d_b = torch.zeros(db_off[-1], dtype=torch.float32, device=dev)
        _launch(kernel, (t, n_split),
                (dy2, lora_b[0], s_act, d_s, d_b, m, n_out, rs, 1.0, m * rs, n_out * rs,
                 *dy2.stride(), 0, 0, *s_act.stride(), rs, 1, rs, 1,
                 pieces, blk, itab, ftab),
                cfg, BLOCK_R=rb, N_SPLIT=n_split)
        return d_s, d_b, pieces

    d_s, d_b, pieces = run_tuned("ds_db", key, (m, n_out, rs, n), rb, launch_ds_db,
                                   operand_bytes=dy2.element_size())
    d_s = d_s[0] if d_s.shape[0] == 1 else d_s.sum(0)
    if deterministic:  # per-piece slots -> per-adapter sums with one fixed-order GEMM
        onehot = (pieces[:, 2][None, :] == torch.arange(n, device=dev, dtype=torch.int32)[:, None]).to(torch.float64)
        red = (onehot @ d_b.view(d_b.shape[0], -1).to(torch.float64)).view(n, n_out, rs)  # exact: no TF32
        d_b = torch.cat([red[i, :, : ranks[i]].reshape(-1) for i in range(n)]).to(torch.float32)

    # dA (with dX to follow: also the keep bits of the adapters' rows, read by dX instead of regenerating
    # the masks; rows of no adapter keep undefined bits, their low-rank term is zero)
    bits = new_keep_bits(x2, max(dropout_ps), max(ranks)) if needs_dx else None
    kernel, key, _ = _prepare("da", dtype=_dtype_name("x", x2), adapter_dtype=_DTYPE_NAMES.get(a_dtype, "float32"),
                              dropout=dropout, rank_bucket=rb, aligned8=k % 8 == 0, deterministic=deterministic,
                              multi=True, keep_bits=bits is not None)

    def launch_da(cfg: TileConfig) -> torch.Tensor:
        pieces, _blk, spans = tables(cfg["BLOCK_M"])
        t = pieces.shape[0]
        k_blocks = cdiv(k, cfg["BLOCK_K"])
        # chunks of equal piece counts (~cfg.split_per_sm programs with work per SM, as the single-adapter
        # kernel's split), unless the adapters alone give that many programs: then one chunk, one
        # program per adapter and plain stores (no atomics; always in deterministic mode)
        want = _split(t, k_blocks, dev, cfg)
        chunk = t if deterministic or n >= want else cdiv(t, want)
        chunks = cdiv(t, chunk)
        if chunks == 1:  # every element stored once, in the adapters' dtype: no zero fill, no cast
            out = torch.empty(da_off[-1], dtype=a_dtype, device=dev)
        else:
            out = torch.zeros(da_off[-1], dtype=torch.float32, device=dev)
        _launch(kernel, (k_blocks, chunks, n),
                (x2, d_s, seeds, out, bits if bits is not None else out, m, k, 0, 0, 1.0, 0, *x2.stride(), *d_s.stride(),
                 k, 1, bits.stride(0) if bits is not None else 0, pieces, spans, itab, ftab, chunk),
                cfg, BLOCK_R=rb, M_SPLIT=chunks)
        return out

    d_a = run_tuned("da", key, (m, k, rs, n), rb, launch_da, operand_bytes=x2.element_size())

    d_x = x2.new_empty(0)
    if needs_dx:
        base = weight if weight is not None else dy2
        fields = dict(dtype=_dtype_name("weight" if weight is not None else "dy", base),
                      adapter_dtype=_dtype_name("lora_a", lora_a[0]), has_weight=weight is not None,
                      dropout=dropout, rank_bucket=rb, aligned8=k % 8 == 0, adapters_aligned=aligned)
        d_x = torch.empty(m, k, dtype=x2.dtype, device=dev)
        d_x = _gemm("dx", fields, dy2, weight, None, d_s, seeds, d_x, tables, itab, ftab, bits=bits)

    return d_x, d_a, d_b
