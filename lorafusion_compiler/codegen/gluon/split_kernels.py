"""shrink and dA of one adapter as one warp-specialised Gluon kernel (Hopper, Triton 3.6 API).

    shrink:  S[M, r]  = (m ⊙ x)[M, K] · Aᵀ[K, r] / (1-p)      (+ the keep bits uint8 [M, K/8], optional)
    da:      dA[r, K] = dSᵀ[r, M] · (m ⊙ x)[M, K] / (1-p)      (+ the keep bits, optional; or m read from them)

Same meaning as ``codegen.kernels.shrink`` / ``da`` (the mask of ``ops.dropout_mask``; A and dS rounded
to bf16 before their products; fp32 accumulation). Why: the mask's integer work bounds both at p > 0;
here it takes ~40% fewer instructions than in the ``tl`` kernels (``masked_tiles``) and runs beside
the loads, which a separate warp issues (H200, 8192×4096, r=16: dA with keep bits 32.5 µs vs the tl
one's 40.6, shrink 29.6 vs 34.0; docs/kernel-notes/dropout-mask.md, sixteenth session). A 1-warp loader streams x tiles
[BLOCK_M, BLOCK_K] and the other operand's tiles (A [r, BLOCK_K] or dS [BLOCK_M, r], fp32 or bf16) by
TMA into a ring (``masked_tiles.ring_loader``); the consumer warpgroup computes a tile's keep words
before its data arrives, masks the x tile in place (``masked_tiles.mask_in_place``), rounds the
other operand to bf16 into a second buffer and runs one async wgmma with the ring slot itself as
x̃'s operand:

    shrink  acc[BLOCK_M, r] += x̃ · Aᵀ     program (m, s): row block m, column tiles s, s + split, ...;
            fp32 atomics into a zeroed [M, r] output (one launch fewer than a separate sum), or with
            ``deterministic`` partial sums to slot s of an fp32 [split, M, r] workspace, summed in a
            fixed order (as the tl shrink);
    da      acc[BLOCK_K, r] += x̃ᵀ · dS    program (k, s): column block k, row tiles s, s + split, ...;
            fp32 atomics into a zeroed [r, K] output (the keep bits stored from the mask's registers).

Keep bits written (``keep_bits``) go out by one TMA store per tile from two staging buffers (rows of K/8
bytes 16-byte aligned: K % 128 == 0; else one byte store each, 2-3x the cost in shrink). dA given the bits
shrink stored (``stored_bits``) TMA-loads them beside each x tile and expands them to the keep words
(``masked_tiles.keep_words_of_bits``) instead of running Philox: 31.2 → 22.7 µs at 8192×4096 (p=0: 20.7),
with shrink 26.4 → 28.3 for storing them (docs/kernel-notes/dropout-mask.md, twenty-first session).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)

from ...ops import dropout_mask
from ..autotune import cdiv, num_sms as sm_count
from ..kernels import _check_bits, _tma_rows
from ..launch import launch as launch_kernel
from .masked_tiles import (keep_byte, keep_words, keep_words_of_bits, mask_in_place, ring_barriers, ring_loader,
                           store_keep_bits)
from .ws_gemm import _acc_layout, _descriptor_of, _pick, check_rank, check_rows_operand, check_same_device

__all__ = ["ROUTED_RANKS", "SUPPORTED_RANKS", "bits_by_tma", "da", "prepare_da", "prepare_shrink", "shrink"]

SUPPORTED_RANKS = (8, 16, 32, 64)
"""Ranks the kernel takes (the low-rank boxes and the wgmma N are max(r, 16) wide; TMA zero-fills beyond r)."""

ROUTED_RANKS = (8, 16, 32, 64)
"""Ranks the "gluon" kernel set sends here (``kernel_set.split_applies``; at p = 0 from r = 32 on it sends
shrink and dA to cuBLAS instead, ``dense_products``). Timed against the ``tl`` kernels at p = 0.1 (H200,
CUDA graphs of 10 calls, µs, shrink / dA with keep bits, Triton -> Gluon): 8192×4096 r=32 43.6 -> 41.2 /
56.8 -> 33.2, r=64 51.0 -> 49.8 / 57.8 -> 50.9; 4096×14336 r=32 70.6 -> 68.6 / 98.2 -> 69.3, r=64 93.9 ->
84.3 / 106.7 -> 95.3. (The slow r=64 layer once blamed on these kernels was the Gluon dX holding an
fp32 dS in registers: ``lora_gemm.fp32_low_is_free``.)"""

_BLOCK_M, _BLOCK_K, _STAGES, _PER_SM, _LOADER_REGS = 64, 128, 4, 2, 40
"""x tile rows and columns, ring depth, programs per SM the split aims at, loader registers."""
_OPTIONS = {"num_warps": 4, "maxnreg": 128}
"""Launch options: the consumer warpgroup is the default partition; 128 registers per thread (no spills,
ptxas, r <= 64) let two programs share an SM (255, ptxas's choice without the cap, allow one)."""


@gluon.jit
def _consumer(x_bufs, o_bufs, bits_bufs, ob, ready, empty, out_ptr, bits_desc, bits_ptr, seed_ptr, threshold, inv_keep,
              M, K, R, fixed, first, stop, step, DA: gl.constexpr, DROPOUT: gl.constexpr, BITS_OUT: gl.constexpr,
              BITS_IN: gl.constexpr, BITS_TMA: gl.constexpr, ATOMIC: gl.constexpr):
    """One warpgroup over the ring: mask each x tile in place (keep words from Philox, also stored as keep
    bits with ``BITS_OUT``: by TMA from two staging buffers ``bits_bufs`` with ``BITS_TMA``, else byte by byte;
    or read from the ring's keep bits ``bits_bufs`` with ``BITS_IN``), round the other operand to bf16 into
    ``ob``, one async wgmma per tile; then (DA) atomics into out [R, K] or (shrink) atomics into out [M, R]
    (``ATOMIC``) or a store into out's slot."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    ROWS: gl.constexpr = x_bufs.type.shape[1]
    COLS: gl.constexpr = x_bufs.type.shape[2]
    O_ROWS: gl.constexpr = o_bufs.type.shape[1]  # dS [ROWS, RP] or A [RP, COLS]
    O_COLS: gl.constexpr = o_bufs.type.shape[2]
    RP: gl.constexpr = _pick(DA, O_COLS, O_ROWS)
    ACC_ROWS: gl.constexpr = _pick(DA, COLS, ROWS)
    o_layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (O_COLS // 4), O_COLS // 4], [4, 1], [1, 0])
    acc_layout: gl.constexpr = _acc_layout(ACC_ROWS, RP)
    acc = gl.zeros([ACC_ROWS, RP], gl.float32, acc_layout)  # the first wgmma ignores it
    i = 0
    prev = 0
    for t in range(first, stop, step):
        s = i % STAGES
        if DA:
            off_m = t * ROWS
            off_k = fixed
        else:
            off_m = fixed
            off_k = t * COLS
        if DROPOUT and not BITS_IN:
            # while the tile is in flight; shrink's lane arithmetic on the multiply pipe (dA's is busier there)
            k0, k1, k2, k3 = keep_words(seed_ptr, threshold, off_m, off_k, K, ROWS, COLS, _pick(DA, False, True))
            if BITS_OUT and not BITS_TMA:
                store_keep_bits(k0, k1, k2, k3, bits_ptr, off_m, off_k, M, K, ROWS, COLS)
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        slot = x_bufs.index(s)
        if DROPOUT:
            if BITS_IN:
                k0, k1, k2, k3 = keep_words_of_bits(bits_bufs.index(s), ROWS, COLS)
            mask_in_place(slot, k0, k1, k2, k3, ROWS, COLS)
        ob.index(i % 2).store(o_bufs.index(s).load(o_layout).to(gl.bfloat16))
        if BITS_OUT and BITS_TMA:
            tma.store_wait(1)  # the store that last used this staging buffer has read it
            bits_bufs.index(i % 2).store(keep_byte(k0, k1, k2, k3))
        fence_async_shared()  # the generic-proxy stores, before the wgmma (and the bits' TMA store) read them
        gl.thread_barrier()  # every warp's stores, before the warpgroup-wide wgmma
        if BITS_OUT and BITS_TMA:
            tma.async_copy_shared_to_global(bits_desc, [off_m, off_k // 8], bits_bufs.index(i % 2))
        if DA:
            acc = warpgroup_mma(slot.permute((1, 0)), ob.index(i % 2), acc, use_acc=i > 0, is_async=True)
        else:
            acc = warpgroup_mma(slot, ob.index(i % 2).permute((1, 0)), acc, use_acc=i > 0, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(empty.index(prev), pred=i > 0)  # the previous tile's wgmma has read its slot
        prev = s
        i += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(empty.index(prev), pred=i > 0)
    if BITS_OUT and BITS_TMA:
        tma.store_wait(0)
    if DROPOUT:
        acc = acc * inv_keep
    jj = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, acc_layout)), 0)
    if DA:
        kk = gl.expand_dims(fixed + gl.arange(0, COLS, layout=gl.SliceLayout(1, acc_layout)), 1)
        gl.atomic_add(out_ptr + jj * K + kk, acc, mask=(jj < R) & (kk < K), sem="relaxed")  # dA[j, k] += acc[k, j]
    else:
        mm = gl.expand_dims(fixed + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout)), 1)
        in_bounds = (mm < M) & (jj < R)
        if ATOMIC:
            gl.atomic_add(out_ptr + mm.to(gl.int64) * R + jj, acc, mask=in_bounds, sem="relaxed")
        else:
            slot_ptr = out_ptr + gl.program_id(1).to(gl.int64) * M * R  # this program's partial sum
            gl.store(slot_ptr + mm.to(gl.int64) * R + jj, acc, mask=in_bounds)


@gluon.jit
def _split_kernel(x_desc, o_desc, bits_desc, out_ptr, bits_ptr, seed_ptr, threshold, inv_keep, M, K, R,
                  SPLIT: gl.constexpr, STAGES: gl.constexpr, DA: gl.constexpr, DROPOUT: gl.constexpr,
                  BITS_OUT: gl.constexpr, BITS_IN: gl.constexpr, BITS_TMA: gl.constexpr, ATOMIC: gl.constexpr,
                  LOADER_REGS: gl.constexpr):
    """shrink (DA=False) or dA (DA=True), see the module docstring: x_desc boxes [BLOCK_M, BLOCK_K] of x
    (bf16); o_desc boxes of A [RP, BLOCK_K] or dS [BLOCK_M, RP] (fp32 or bf16); out fp32 ([SPLIT, M, R]
    slots, or zeroed: [M, R] with ATOMIC, [R, K] for DA); keep bits uint8 [M, K/8] written from the mask
    (BITS_OUT: through bits_desc's boxes [BLOCK_M, BLOCK_K/8] with BITS_TMA, else through bits_ptr) or, dA,
    read through bits_desc's boxes (BITS_IN, always TMA); seed int64 []."""
    ROWS: gl.constexpr = x_desc.block_type.shape[0]
    COLS: gl.constexpr = x_desc.block_type.shape[1]
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    o_bufs = gl.allocate_shared_memory(o_desc.dtype, [STAGES] + o_desc.block_type.shape, o_desc.layout)
    ob = gl.allocate_shared_memory(gl.bfloat16, [2] + o_desc.block_type.shape,
                                   gl.NVMMASharedLayout.get_default_for(o_desc.block_type.shape, gl.bfloat16))
    gl.static_assert(not (BITS_IN and BITS_OUT))
    if BITS_IN:  # one keep-bits tile per ring slot
        bits_bufs = gl.allocate_shared_memory(bits_desc.dtype, [STAGES] + bits_desc.block_type.shape, bits_desc.layout)
    elif BITS_OUT and BITS_TMA:  # two staging buffers for the TMA stores
        bits_bufs = gl.allocate_shared_memory(bits_desc.dtype, [2] + bits_desc.block_type.shape, bits_desc.layout)
    else:
        bits_bufs = x_bufs  # never read
    ready, empty = ring_barriers(STAGES)
    # dA walks the row tiles of column block k; shrink the column tiles of row block m
    fixed = gl.program_id(0) * _pick(DA, COLS, ROWS)
    first = gl.program_id(1)
    stop = gl.cdiv(M, ROWS) if DA else gl.cdiv(K, COLS)
    gl.warp_specialize([
        (_consumer, (x_bufs, o_bufs, bits_bufs, ob, ready, empty, out_ptr, bits_desc, bits_ptr, seed_ptr, threshold,
                     inv_keep, M, K, R, fixed, first, stop, SPLIT, DA, DROPOUT, BITS_OUT, BITS_IN, BITS_TMA, ATOMIC)),
        (ring_loader, (x_desc, o_desc, x_bufs, o_bufs, ready, empty, fixed, first, stop, SPLIT, DA, False, bits_desc,
                       bits_bufs, BITS_IN)),
    ], [1], [LOADER_REGS])


Launch = tuple[tuple[int, int], tuple, dict, torch.Tensor]
"""(grid, arguments, constexprs, output) of one ``_split_kernel`` launch."""


def _check(x: torch.Tensor, other: torch.Tensor, other_name: str, other_dims: str, seed: torch.Tensor, p: float) -> int:
    """Validate x, the low-rank operand and the seed; returns the rank."""
    check_rows_operand("x", x, ("M", "K"))
    m, k = x.shape
    want = (m, None) if other_dims == "[M, r]" else (None, k)
    if (other.dim() != 2 or other.dtype not in (torch.float32, torch.bfloat16) or not _tma_rows(other)
            or any(w is not None and w != got for w, got in zip(want, other.shape))):
        raise ValueError(f"{other_name} must be a row-major float32 or bfloat16 {other_dims} tensor (M={m}, K={k}) with "
                         f"16-byte aligned rows, got {other.dtype} {tuple(other.shape)} with strides {other.stride()}")
    r = other.shape[1] if other_dims == "[M, r]" else other.shape[0]
    check_rank(r, SUPPORTED_RANKS, f"{other_name}.shape={tuple(other.shape)}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be a one-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
    dropout_mask.drop_threshold(p)  # raises for p outside [0, 1)
    check_same_device(x=x, **{other_name: other}, seed=seed)
    return r


def split_of(tiles: int, programs: int, per_sm: int, num_sms: int | None, device: torch.device) -> int:
    """Programs along the reduction for ``programs`` along the other dimension: about ``per_sm`` per SM in
    all, at most one per reduction tile (``num_sms`` defaults to the device's)."""
    return max(1, min(tiles, (per_sm * (num_sms or sm_count(device))) // max(1, programs)))


def _args(x, other, box, out, seed, p, r, split, da_mode: bool, atomic: bool, *, bits_out=None,
          bits_in=None) -> tuple[tuple, dict]:
    bits = bits_in if bits_in is not None else bits_out
    bits_tma = bits is not None and bits_by_tma(bits)
    bits_desc = _descriptor_of(bits, [_BLOCK_M, _BLOCK_K // 8]) if bits_tma else None
    bits_ptr = bits_out if bits_out is not None else out
    args = (_descriptor_of(x, [_BLOCK_M, _BLOCK_K]), _descriptor_of(other, box), bits_desc, out, bits_ptr, seed,
            dropout_mask.drop_threshold(p), 1.0 / (1.0 - p), x.shape[0], x.shape[1], r)
    return args, dict(SPLIT=split, STAGES=_STAGES, DA=da_mode, DROPOUT=p != 0.0, BITS_OUT=bits_out is not None,
                      BITS_IN=bits_in is not None, BITS_TMA=bits_tma, ATOMIC=atomic, LOADER_REGS=_LOADER_REGS)


def bits_by_tma(bits: torch.Tensor) -> bool:
    """Whether the Gluon dA can read these keep bits (uint8 [M, K/8]) through TMA boxes: rows 16-byte aligned,
    i.e. K % 128 == 0. Elsewhere it regenerates the (same) mask from the seed."""
    return _tma_rows(bits)


def prepare_shrink(x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, p: float, *,
                   deterministic: bool = False, keep_bits: torch.Tensor | None = None,
                   num_sms: int | None = None) -> Launch:
    """Checks and launch arguments of ``shrink`` (host work only: with ``num_sms`` given it needs no GPU).
    The output is [1, M, r] (split 1, or atomics into zeros) or [split, M, r] partial sums (``deterministic``)."""
    r = _check(x, lora_a, "lora_a", "[r, K]", seed, p)
    m, k = x.shape
    _check_bits(keep_bits, m, k, p, x.device)
    m_blocks = cdiv(m, _BLOCK_M)
    split = split_of(cdiv(k, _BLOCK_K), m_blocks, _PER_SM, num_sms, x.device)
    atomic = split > 1 and not deterministic
    if atomic:
        out = torch.zeros(1, m, r, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(split, m, r, dtype=torch.float32, device=x.device)
    args, constexprs = _args(x, lora_a, [max(16, r), _BLOCK_K], out, seed, p, r, split, False, atomic,
                             bits_out=keep_bits)
    return (m_blocks, split), args, constexprs, out


def prepare_da(x: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor, p: float, *,
               keep_bits: torch.Tensor | None = None, stored_bits: torch.Tensor | None = None,
               num_sms: int | None = None) -> Launch:
    """Checks and launch arguments of ``da`` (host work only, as ``prepare_shrink``)."""
    r = _check(x, ds, "ds", "[M, r]", seed, p)
    m, k = x.shape
    dropout_mask.one_bits_role(keep_bits, stored_bits)
    _check_bits(keep_bits, m, k, p, x.device)
    _check_bits(stored_bits, m, k, p, x.device)
    k_blocks = cdiv(k, _BLOCK_K)
    split = split_of(cdiv(m, _BLOCK_M), k_blocks, _PER_SM, num_sms, x.device)
    out = torch.zeros(r, k, dtype=torch.float32, device=x.device)
    bits_in = stored_bits if stored_bits is not None and bits_by_tma(stored_bits) else None
    args, constexprs = _args(x, ds, [_BLOCK_M, max(16, r)], out, seed, p, r, split, True, False, bits_out=keep_bits,
                             bits_in=bits_in)
    return (k_blocks, split), args, constexprs, out


def _run(launch: Launch) -> torch.Tensor:
    grid, args, constexprs, out = launch
    launch_kernel(_split_kernel, grid, args, constexprs, _OPTIONS)
    return out


def shrink(x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, p: float, *,
           deterministic: bool = False, keep_bits: torch.Tensor | None = None) -> torch.Tensor:
    """S = dropout(x) Aᵀ -> [M, r] fp32: x [M, K] bf16, A [r, K] fp32 or bf16, r in ``SUPPORTED_RANKS``; with
    ``keep_bits`` (p > 0) the mask is also stored there, for the backward. The K-split partial sums are
    added with fp32 atomics (their order, and so S's last bits, may vary between calls) or,
    ``deterministic``, summed in a fixed order."""
    out = _run(prepare_shrink(x, lora_a, seed, p, deterministic=deterministic, keep_bits=keep_bits))
    return out[0] if out.shape[0] == 1 else out.sum(0)


def da(x: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor, p: float, a_dtype: torch.dtype, *,
       keep_bits: torch.Tensor | None = None, stored_bits: torch.Tensor | None = None) -> torch.Tensor:
    """dA = dSᵀ (m ⊙ x)/(1-p) -> [r, K] in ``a_dtype``: x [M, K] bf16, dS [M, r] fp32 or bf16, r in
    ``SUPPORTED_RANKS``; with ``keep_bits`` (p > 0) the mask is also stored there, for ``dx``; with
    ``stored_bits`` (the mask as ``shrink`` stored it) the mask is read from them (``bits_by_tma``; else
    regenerated from ``seed``, the same mask) instead of computed."""
    out = _run(prepare_da(x, ds, seed, p, keep_bits=keep_bits, stored_bits=stored_bits))
    return out if a_dtype == torch.float32 else out.to(a_dtype)
