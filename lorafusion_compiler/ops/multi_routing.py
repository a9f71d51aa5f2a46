"""Routing tables of the multi-adapter kernels, built on the device once per batch.

The kernels cut the M rows of x into *pieces* at every multiple of their row block BLOCK_M
and at every adapter range boundary, so a piece has <= BLOCK_M rows of one adapter (or of
none). For one BLOCK_M the tables are (T = cdiv(M, BLOCK_M) + 2n pieces, a length that does
not depend on the routing values, so nothing is read back to the host):

* pieces int32 [T, 4]: (row start, row end, adapter or -1, adapter's first row);
* blk int32 [cdiv(M, BLOCK_M) + 1]: the pieces of row block b are blk[b] .. blk[b+1]-1;
* spans int32 [n, 2]: first and last piece of each adapter (T and -1 for adapters without rows).

``torch.ops.lorafusion.multi_routing(adapter_rows, x)`` packs the tables of every row block
in ``ROUTING_BLOCK_MS`` into one flat int32 tensor. Built once per forward (the compiler pass
inserts one node per routing table and feeds it to every multi-adapter site), it spares each
kernel launch a rebuild (small torch ops that a CUDA graph would replay at every launch).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ROUTING_BLOCK_MS", "build_routing", "multi_routing", "routing_size", "unpack_routing"]

ROUTING_BLOCK_MS = (32, 64, 128, 256)
"""Row blocks whose tables a packed routing tensor holds (every BLOCK_M of the tile configs);
each is twice the previous one (``build_routing`` derives them on the device)."""


def _sizes(m, n: int, block_m: int):
    """(pieces, blk, spans) element counts of one row block's tables (m may be a SymInt)."""
    blocks = (m + block_m - 1) // block_m
    return 4 * (blocks + 2 * n), blocks + 1, 2 * n


def routing_size(m, n: int):
    """Elements of the packed routing tensor for M rows and n adapters (m may be a SymInt)."""
    return sum(sum(_sizes(m, n, bm)) for bm in ROUTING_BLOCK_MS)


def build_routing(adapter_rows: Tensor, m: int) -> Tensor:
    """Packed int32 tables of ``adapter_rows`` (int64 [n, 2]: start, count) for M rows, every
    row block of ``ROUTING_BLOCK_MS`` at once (~25 device ops in all, no host sync).

    Per row block b the cut points (multiples of b, range starts and ends, M; padded with M to
    a common length) are sorted; consecutive points bound a piece. Padding only adds empty
    pieces at the end, so the first cdiv(M, b) + 2n pieces are that block's table.
    """
    dev = adapter_rows.device
    n = adapter_rows.shape[0]
    nb = len(ROUTING_BLOCK_MS)
    # BLOCK_M of each row: ROUTING_BLOCK_MS[0] * 2**b, from arange (no host-to-device copy: capturable)
    bms = (ROUTING_BLOCK_MS[0] << torch.arange(nb, device=dev, dtype=torch.int64))[:, None]  # [B, 1]
    live = adapter_rows[:, 1] > 0  # adapters without rows cut nothing (their start could be anywhere)
    starts = torch.where(live, adapter_rows[:, 0], 0).clamp(0, m)
    ends = torch.where(live, adapter_rows[:, 0] + adapter_rows[:, 1], 0).clamp(0, m)
    most = -(-m // ROUTING_BLOCK_MS[0])  # row blocks of the smallest BLOCK_M
    steps = torch.arange(most + 1, device=dev, dtype=torch.int64)[None, :]
    bounds = (steps * bms).clamp(max=m)  # [B, most + 1]: row-block starts, then M
    pts = torch.cat([bounds, starts.expand(nb, n), ends.expand(nb, n)], 1).sort(1).values
    lo, hi = pts[:, :-1], pts[:, 1:]  # [B, L], L = most + 2n
    owner = (starts <= lo[..., None]) & (lo[..., None] < ends) & (hi > lo)[..., None]  # [B, L, n]
    has = owner.any(-1)
    ad = torch.where(has, owner.to(torch.int32).argmax(-1), -1)
    seg0 = torch.where(has, starts[ad.clamp(min=0)], 0)
    pieces = torch.stack([lo, hi, ad.to(torch.int64), seg0], -1).to(torch.int32)  # [B, L, 4]
    blk = torch.searchsorted(lo.contiguous(), bounds).to(torch.int32)  # [B, most + 1]: pieces with lo < bound
    # spans: first / last piece of each adapter (pieces past a block's own table are empty: ad = -1)
    idx = torch.arange(lo.shape[1], device=dev)[None, :, None]
    own = ad[..., None] == torch.arange(n, device=dev, dtype=ad.dtype)  # [B, L, n]
    table_len = (m + bms - 1) // bms + 2 * n  # [B, 1]: T of each row block
    first = torch.where(own, idx, lo.shape[1]).amin(1)
    first = torch.where(first == lo.shape[1], table_len, first)
    last = torch.where(own, idx, -1).amax(1)
    spans = torch.stack([first, last], -1).to(torch.int32)  # [B, n, 2]
    parts = []
    for b, bm in enumerate(ROUTING_BLOCK_MS):
        n_pieces, n_blk, _ = _sizes(m, n, bm)
        parts += [pieces[b, : n_pieces // 4].reshape(-1), blk[b, :n_blk], spans[b].reshape(-1)]
    return torch.cat(parts)


def unpack_routing(routing: Tensor, m: int, n: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views (pieces [T, 4], blk, spans [n, 2]) of one row block's tables in a packed routing tensor."""
    if block_m not in ROUTING_BLOCK_MS:
        raise ValueError(f"BLOCK_M={block_m} has no table in a packed routing tensor (it holds {ROUTING_BLOCK_MS})")
    if routing.dtype != torch.int32 or routing.dim() != 1 or routing.numel() != routing_size(m, n):
        raise ValueError(f"routing must be int32 [{routing_size(m, n)}] for {m} rows and {n} adapters "
                         f"(from torch.ops.lorafusion.multi_routing), got {routing.dtype} {tuple(routing.shape)}")
    offset = 0
    for bm in ROUTING_BLOCK_MS:
        n_pieces, n_blk, n_spans = _sizes(m, n, bm)
        if bm == block_m:
            views = routing[offset: offset + n_pieces].view(-1, 4), routing[offset + n_pieces: offset + n_pieces + n_blk]
            return (*views, routing[offset + n_pieces + n_blk: offset + n_pieces + n_blk + n_spans].view(n, 2))
        offset += n_pieces + n_blk + n_spans
    raise AssertionError("unreachable")


@torch.library.custom_op("lorafusion::multi_routing", mutates_args=())
def multi_routing(adapter_rows: Tensor, x: Tensor) -> Tensor:
    """Packed int32 routing tables of ``adapter_rows`` [n, 2] for the rows of x [..., K]
    (x gives the row count and the device; its values are not read)."""
    return build_routing(adapter_rows.to(x.device), x.numel() // x.shape[-1])


@multi_routing.register_fake
def _(adapter_rows, x):
    m = x.numel() // x.shape[-1]
    return x.new_empty(routing_size(m, adapter_rows.shape[0]), dtype=torch.int32)
