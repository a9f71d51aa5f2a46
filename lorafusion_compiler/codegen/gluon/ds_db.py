"""dS and dB of one adapter from one read of dY, as a warp-specialised Gluon kernel (Hopper, Triton 3.6 API).

    dS[M, r] = s · dY[M, N] · B[N, r]        dB[N, r] = s · dYᵀ[N, M] · S[M, r]

Same meaning as ``codegen.kernels.ds_db`` (B and S rounded to bf16 before their products, fp32
accumulation, dS in fp32, dB in B's dtype). Why: the ``tl`` kernel loads dY through pointers and took
29.0 µs at 8192×4096, r=16 (H200) against 21.4 for cuBLAS's dY·B alone; this one 25.3 (its dB atomics
cost ~2 µs, ``_BLOCK_M``). Here a 1-warp loader streams dY tiles [BLOCK_M, BLOCK_N] and B's rows [BLOCK_N, r]
by TMA into a ring (``masked_tiles.ring_loader``, B in the other operand's place); the consumer
warpgroup keeps its rows of S in shared memory (rounded to bf16 once) and per tile runs two async
wgmmas on the ring slot:

    dS  acc[BLOCK_M, r] += dY_tile · B_tile          (kept in registers over the program's tiles)
    dB  part[BLOCK_N, r] = dY_tileᵀ · S_rows         (added at once into dB with fp32 atomics)

Program (m, s) owns row block m and column tiles s, s + split, ...; its dS rows meet the other
splits' in fp32 atomics at the end. Both outputs are one zeroed fp32 buffer (one fill). Atomics make
the last bits vary between calls; ``deterministic`` callers take the ``tl`` kernel.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait

from ..autotune import cdiv
from ..kernels import _tma_rows
from ..launch import launch as launch_kernel
from .masked_tiles import ring_barriers, ring_loader
from .split_kernels import split_of
from .ws_gemm import _acc_layout, _descriptor_of, check_rank, check_rows_operand, check_same_device

__all__ = ["SUPPORTED_RANKS", "ds_db", "prepare_ds_db"]

SUPPORTED_RANKS = (8, 16, 32)
"""Ranks the kernel takes (the wgmma N is max(r, 16); TMA zero-fills B's columns beyond r). From r = 64 on,
``dense_products`` (two cuBLAS matmuls) runs ds_db in both GPU sets."""

_BLOCK_M, _BLOCK_N, _STAGES, _PER_SM, _LOADER_REGS = 256, 128, 2, 1, 40
"""dY tile rows and columns, ring depth, programs per SM the split aims at, loader registers. The dB atomics,
(M / BLOCK_M)·N·r in all, are what this kernel spends beyond its read of dY: H200, r=16, µs, 8192×4096 /
8192×14336 / 2048×4096, tiles 128×64 (4 slots, 2 per SM) 27.8 / 76.8 / 9.3, the same without the dB
atomics 23.6 / 63.4 / 8.3, 256×128 (2 slots, 1 per SM) 25.3 / 68.7 / 9.6, tl 29.0 / 73.1 / 10.3
(``docs/kernel-notes/split-kernels.md``, twentieth session). One slot takes 64 KiB of dY and at most 16 KiB of B."""
_OPTIONS = {"num_warps": 4, "maxnreg": 128}
"""Launch options: the consumer warpgroup is the default partition; 128 registers: no spills at r <= 32 (ptxas)."""


@gluon.jit
def _consumer(dy_bufs, b_bufs, bb, s_rows, ready, empty, s_ptr, stride_sm, out_ptr, scale, M, N, R, fixed, first,
              stop, step):
    """One warpgroup over the ring: S's rows into ``s_rows`` (bf16), then per tile B rounded into ``bb``,
    dS += dY·B (async, kept) and dB part = dYᵀ·S (added into out[M·R:] with atomics); at the end dS
    into out[:M·R] with atomics."""
    STAGES: gl.constexpr = dy_bufs.type.shape[0]
    ROWS: gl.constexpr = dy_bufs.type.shape[1]
    COLS: gl.constexpr = dy_bufs.type.shape[2]
    RP: gl.constexpr = b_bufs.type.shape[2]
    r_layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (RP // 4), RP // 4], [4, 1], [1, 0])
    rows = fixed + gl.arange(0, ROWS, layout=gl.SliceLayout(1, r_layout))
    cols = gl.arange(0, RP, layout=gl.SliceLayout(0, r_layout))
    s_mask = gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < R, 0)
    s = gl.load(s_ptr + gl.expand_dims(rows.to(gl.int64) * stride_sm, 1) + gl.expand_dims(cols, 0), mask=s_mask,
                other=0.0)
    s_rows.store(s.to(gl.bfloat16))  # made visible by the first tile's fence and barrier
    ds_layout: gl.constexpr = _acc_layout(ROWS, RP)
    db_layout: gl.constexpr = _acc_layout(COLS, RP)
    ds_acc = gl.zeros([ROWS, RP], gl.float32, ds_layout)  # the first wgmma ignores it
    db_zero = gl.zeros([COLS, RP], gl.float32, db_layout)
    jj = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, db_layout)), 0)
    db_ptr = out_ptr + M * R
    i = 0
    for t in range(first, stop, step):
        st = i % STAGES
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        slot = dy_bufs.index(st)
        bb.store(b_bufs.index(st).load(r_layout).to(gl.bfloat16))
        fence_async_shared()  # the generic-proxy stores, before the wgmmas read them
        gl.thread_barrier()  # every warp's stores, before the warpgroup-wide wgmmas
        ds_acc = warpgroup_mma(slot, bb, ds_acc, use_acc=i > 0, is_async=True)
        db = warpgroup_mma(slot.permute((1, 0)), s_rows, db_zero, use_acc=False, is_async=True)
        ds_acc, db = warpgroup_mma_wait(num_outstanding=0, deps=(ds_acc, db))
        mbarrier.arrive(empty.index(st))  # both wgmmas have read the slot (and bb)
        nn = gl.expand_dims(t * COLS + gl.arange(0, COLS, layout=gl.SliceLayout(1, db_layout)), 1)
        gl.atomic_add(db_ptr + nn.to(gl.int64) * R + jj, db * scale, mask=(nn < N) & (jj < R), sem="relaxed")
        i += 1
    mm = gl.expand_dims(fixed + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ds_layout)), 1)
    jd = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, ds_layout)), 0)
    gl.atomic_add(out_ptr + mm.to(gl.int64) * R + jd, ds_acc * scale, mask=(mm < M) & (jd < R), sem="relaxed")


@gluon.jit
def _ds_db_kernel(dy_desc, b_desc, s_ptr, stride_sm, out_ptr, scale, M, N, R, SPLIT: gl.constexpr,
                  STAGES: gl.constexpr, LOADER_REGS: gl.constexpr):
    """See the module docstring: dy_desc boxes [BLOCK_M, BLOCK_N] of dY (bf16); b_desc boxes [BLOCK_N, RP]
    of B [N, r] (fp32 or bf16); S [M, r] fp32 or bf16 (row stride ``stride_sm``); out a zeroed fp32
    buffer of (M + N)·R: dS [M, R], then dB [N, R]."""
    ROWS: gl.constexpr = dy_desc.block_type.shape[0]
    RP: gl.constexpr = b_desc.block_type.shape[1]
    dy_bufs = gl.allocate_shared_memory(dy_desc.dtype, [STAGES] + dy_desc.block_type.shape, dy_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    bb = gl.allocate_shared_memory(gl.bfloat16, b_desc.block_type.shape,
                                   gl.NVMMASharedLayout.get_default_for(b_desc.block_type.shape, gl.bfloat16))
    s_rows = gl.allocate_shared_memory(gl.bfloat16, [ROWS, RP], gl.NVMMASharedLayout.get_default_for([ROWS, RP],
                                                                                                   gl.bfloat16))
    ready, empty = ring_barriers(STAGES)
    fixed = gl.program_id(0) * ROWS
    first = gl.program_id(1)
    stop = gl.cdiv(N, dy_desc.block_type.shape[1])
    gl.warp_specialize([
        (_consumer, (dy_bufs, b_bufs, bb, s_rows, ready, empty, s_ptr, stride_sm, out_ptr, scale, M, N, R, fixed,
                     first, stop, SPLIT)),
        (ring_loader, (dy_desc, b_desc, dy_bufs, b_bufs, ready, empty, fixed, first, stop, SPLIT, False, True, dy_desc,
                       dy_bufs, False)),
    ], [1], [LOADER_REGS])


Launch = tuple[tuple[int, int], tuple, dict, torch.Tensor]
"""(grid, arguments, constexprs, output) of one ``_ds_db_kernel`` launch."""


def _check(dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor) -> int:
    """Validate the operands; returns the rank."""
    check_rows_operand("dy", dy, ("M", "N"))
    m, n = dy.shape
    if (lora_b.dim() != 2 or lora_b.shape[0] != n or lora_b.dtype not in (torch.float32, torch.bfloat16)
            or not _tma_rows(lora_b)):
        raise ValueError(f"lora_b must be a row-major float32 or bfloat16 [N, r] tensor (N={n}) with 16-byte aligned "
                         f"rows, got {lora_b.dtype} {tuple(lora_b.shape)} with strides {lora_b.stride()}")
    r = lora_b.shape[1]
    check_rank(r, SUPPORTED_RANKS, f"lora_b.shape={tuple(lora_b.shape)}")
    if (s_act.dim() != 2 or tuple(s_act.shape) != (m, r) or s_act.dtype not in (torch.float32, torch.bfloat16)
            or s_act.stride(1) != 1):
        raise ValueError(f"s_act must be a float32 or bfloat16 [M, r] = [{m}, {r}] tensor with unit column stride, "
                         f"got {s_act.dtype} {tuple(s_act.shape)} with strides {s_act.stride()}")
    check_same_device(dy=dy, lora_b=lora_b, s_act=s_act)
    return r


def prepare_ds_db(dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor, scale: float, *,
                  num_sms: int | None = None) -> Launch:
    """Checks and launch arguments of ``ds_db`` (host work only: with ``num_sms`` given it needs no GPU).
    The output is one zeroed fp32 buffer of (M + N)·r: dS [M, r], then dB [N, r]."""
    r = _check(dy, lora_b, s_act)
    m, n = dy.shape
    m_blocks = cdiv(m, _BLOCK_M)
    n_tiles = cdiv(n, _BLOCK_N)
    split = split_of(n_tiles, m_blocks, _PER_SM, num_sms, dy.device)
    rp = max(16, r)
    out = torch.zeros((m + n) * r, dtype=torch.float32, device=dy.device)
    args = (_descriptor_of(dy, [_BLOCK_M, _BLOCK_N]), _descriptor_of(lora_b, [_BLOCK_N, rp]), s_act, s_act.stride(0),
            out, float(scale), m, n, r)
    constexprs = dict(SPLIT=split, STAGES=_STAGES, LOADER_REGS=_LOADER_REGS)
    return (m_blocks, split), args, constexprs, out


def ds_db(dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s·dY·B [M, r] (fp32) and dB = s·dYᵀ·S [N, r] (B's dtype): dY [M, N] bf16, B [N, r] fp32 or bf16,
    S [M, r] fp32 or bf16, r in ``SUPPORTED_RANKS``. Partial sums meet in fp32 atomics (their order, and so
    the last bits, may vary between calls)."""
    grid, args, constexprs, out = prepare_ds_db(dy, lora_b, s_act, scale)
    launch_kernel(_ds_db_kernel, grid, args, constexprs, _OPTIONS)
    m, n = dy.shape
    r = lora_b.shape[1]
    d_s, d_b = out[: m * r].view(m, r), out[m * r:].view(n, r)
    return d_s, (d_b if lora_b.dtype == torch.float32 else d_b.to(lora_b.dtype))
