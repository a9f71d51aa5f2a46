"""The two fused LoRA GEMMs as one warp-specialised Gluon kernel family (Hopper, Triton 3.6 API).

    base_expand:  y[M,N]  = x[M,K]·W[N,K]ᵀ + bias[N] + scale·S[M,r]·B[N,r]ᵀ
    dx:           dX[M,K] = dY[M,N]·W[N,K]  + m ⊙ (dS[M,r]·A[r,K]) / (1-p)

Same meaning and numerics as ``codegen.kernels.base_expand`` / ``dx`` (outputs bitwise equal on an
H200): the low-rank product is the accumulator's first step (bf16 operands, fp32 accumulation; fp32
dS rounded to bf16 before its dot), scaled (and masked) in fp32, the main loop accumulates on top,
then + bias, cast to bf16, TMA store. Built on ``ws_gemm`` (tile walk, accumulator layout, epilogue):

* a 1-warp loader: the main operands into the ring as in ``ws_gemm``, and per tile the low-rank
  operands into one of two slots (S or dS [BM, r]; B [BN, r] or A [r, BN]; for dX with keep bits,
  the bits as int32 words [BM, BN/32] when K % 128 == 0), one tile ahead. An fp32 B or A (PEFT's
  adapters) the consuming warpgroup rounds into its slot itself (``store_r``), so no cast kernel
  runs before the launch;
* two consumer warpgroups on alternate tiles (ping-pong): one's low-rank prologue and epilogue
  overlap the other's main loop.

The keep mask needs no layout conversion: with the accumulator layout re-indexed as (word, byte,
bit) of the keep bits (``bits_layout4``), each thread loads exactly the words of its own
elements, and ``convert_layout(..., assert_trivial=True)`` proves at trace time that nothing
moves between threads. Ranks 8, 16, 32, 64: the low-rank boxes are max(r, 16) wide and TMA
zero-fills beyond r. Measured: ``docs/kernel-notes/fused-gemms.md``, "The fused LoRA GEMMs in Gluon".
"""

from __future__ import annotations

import functools
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..autotune import num_sms as sm_count
from ..kernels import _check_bits, _tma_rows
from ..launch import launch as launch_kernel
from .low_rank_tiles import bits_layout4, keep_mask, store_r
from .ws_gemm import (_OPTIONS, _SMEM_LIMIT, _acc_layout, _check_operand, _descriptor_of, _epilogue, _pick,
                      _tile_offsets, check_rank, check_same_device)

__all__ = ["MIN_DX_STAGES", "R_FP32_MAX_RANK", "SUPPORTED_RANKS", "base_expand", "bias_ok", "deep_ring", "dx",
           "fp32_low_is_free", "prepare_base_expand", "prepare_dx"]

SUPPORTED_RANKS = (8, 16, 32, 64)
"""Ranks the kernels take (the low-rank wgmma's K is max(r, 16); larger ranks use the ``tl`` kernels)."""


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@gluon.jit
def _lr_issue(l_desc, r_desc, bits_desc, lr_l, lr_r, lr_bits, lr_ready, lr_empty, t, tile_id, num_pid_m, num_pid_n,
              B_KMAJOR: gl.constexpr, BITS_TMA: gl.constexpr, R_FP32: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    # Low-rank operands of the program's t-th tile into LR slot t % 2 (a 2-deep ring: use u = t // 2 of a
    # slot waits for the release of use u - 1; fresh barriers pass parity 1 at once). An fp32 R is not
    # loaded here: the consumer rounds it into its slot itself (``store_r``).
    off_m, off_n = _tile_offsets(tile_id, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
    slot = t % 2
    mbarrier.wait(lr_empty.index(slot), ((t // 2) & 1) ^ 1)
    bar = lr_ready.index(slot)
    nbytes: gl.constexpr = l_desc.block_type.nbytes + _pick(R_FP32, 0, r_desc.block_type.nbytes) + \
        _pick(BITS_TMA, bits_desc.block_type.nbytes, 0)
    mbarrier.expect(bar, nbytes)
    tma.async_copy_global_to_shared(l_desc, [off_m, 0], bar, lr_l.index(slot))
    if not R_FP32:
        if B_KMAJOR:
            tma.async_copy_global_to_shared(r_desc, [off_n, 0], bar, lr_r.index(slot))
        else:
            tma.async_copy_global_to_shared(r_desc, [0, off_n], bar, lr_r.index(slot))
    if BITS_TMA:
        # keep bits as int32 words [M, K/32]: 32 output columns per word
        gl.static_assert(bits_desc.block_type.shape[1] * 32 == BLOCK_N)
        tma.async_copy_global_to_shared(bits_desc, [off_m, off_n // 32], bar, lr_bits.index(slot))


@gluon.jit
def _lora_loader(a_desc, b_desc, l_desc, r_desc, bits_desc, a_bufs, b_bufs, ready, empty, lr_l, lr_r, lr_bits,
                 lr_ready, lr_empty, M, N, K, B_KMAJOR: gl.constexpr, BITS_TMA: gl.constexpr, R_FP32: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    # TMA producer (1 warp): per tile t, first the LR operands of tile t + 1, then the ring loads of tile t
    # (the ring protocol is ws_gemm._loader's). LR(0) goes before the loop.
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    NUM_STAGES: gl.constexpr = a_bufs.type.shape[0]
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = gl.cdiv(K, BLOCK_K)
    if pid < num_tiles:
        _lr_issue(l_desc, r_desc, bits_desc, lr_l, lr_r, lr_bits, lr_ready, lr_empty, 0, pid, num_pid_m, num_pid_n,
                  B_KMAJOR, BITS_TMA, R_FP32, BLOCK_M, BLOCK_N, GROUP_M)
    it = 0
    t = 0
    for tile_id in range(pid, num_tiles, nprog):
        if tile_id + nprog < num_tiles:
            _lr_issue(l_desc, r_desc, bits_desc, lr_l, lr_r, lr_bits, lr_ready, lr_empty, t + 1, tile_id + nprog,
                      num_pid_m, num_pid_n, B_KMAJOR, BITS_TMA, R_FP32, BLOCK_M, BLOCK_N, GROUP_M)
        off_m, off_n = _tile_offsets(tile_id, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
        for kk in range(k_tiles):
            s = it % NUM_STAGES
            mbarrier.wait(empty.index(s), ((it // NUM_STAGES) & 1) ^ 1)
            bar, a_buf, b_buf = ready.index(s), a_bufs.index(s), b_bufs.index(s)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, kk * BLOCK_K], bar, a_buf)
            if B_KMAJOR:
                tma.async_copy_global_to_shared(b_desc, [off_n, kk * BLOCK_K], bar, b_buf)
            else:
                tma.async_copy_global_to_shared(b_desc, [kk * BLOCK_K, off_n], bar, b_buf)
            it += 1
        t += 1

@gluon.jit
def _lora_consumer(a_bufs, b_bufs, ready, empty, order, lr_l, lr_r, lr_bits, lr_ready, lr_empty, c_desc, c_bufs,
                   bias_ptr, bits_ptr, stride_bits, r_ptr, stride_r, R, lscale, M, N, K, WG: gl.constexpr,
                   B_KMAJOR: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_BITS: gl.constexpr, BITS_TMA: gl.constexpr,
                   R_FP32: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """One consumer warpgroup (WG 0 or 1) on every other tile: low-rank prologue, main loop, epilogue."""
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    NUM_STAGES: gl.constexpr = a_bufs.type.shape[0]
    ROWS: gl.constexpr = BLOCK_M
    acc_layout: gl.constexpr = _acc_layout(ROWS, BLOCK_N)
    L4: gl.constexpr = bits_layout4(ROWS, BLOCK_N)
    words_layout: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))  # int32 [ROWS, BLOCK_N/32] (TMA path)
    bytes_layout: gl.constexpr = gl.SliceLayout(3, L4)  # uint8 [ROWS, BLOCK_N/32, 4] (global path)
    # dS arrives as fp32: read it into the wgmma A-operand register layout and round to bf16 there
    # (k_width 2 = two bf16 per 32-bit register); S (bf16) is used from shared memory directly.
    L_IN_REGS: gl.constexpr = lr_l.dtype != gl.bfloat16
    l_reg_layout: gl.constexpr = gl.DotOperandLayout(0, acc_layout, 2)

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = gl.cdiv(K, BLOCK_K)

    first = pid + WG * nprog
    step = 2 * nprog
    it = WG * k_tiles  # ring position of this warpgroup's first tile (program-local tile index WG)
    t = WG  # program-local tile index (selects the LR slot and its parity)
    t_step = 2
    n_store = 0
    j = 0  # tiles done by this warpgroup
    acc = gl.zeros([ROWS, BLOCK_N], gl.float32, acc_layout)
    for tile_id in range(first, num_tiles, step):
        off_m, off_n = _tile_offsets(tile_id, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
        row0 = off_m
        if HAS_BIAS:
            # issued now, used in the epilogue: the latency hides behind the prologue and main loop
            offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
            # (N % 8 == 0: the mask is constant over 8-column runs, so each thread's 2 adjacent columns
            # load as one 32-bit access)
            bias = gl.load(bias_ptr + offs_n, mask=(offs_n // 8) * 8 < N, other=0.0)

        # ---- low-rank prologue: acc = L . R (one wgmma, use_acc=False), then scale / mask -------------
        slot = t % 2  # == WG: a warpgroup's tiles always use its own slot
        r_op = lr_r.index(slot)
        if R_FP32:
            store_r(r_ptr, stride_r, r_op, off_n, N, R, B_KMAJOR)  # the slot's last wgmma was waited for
        mbarrier.wait(lr_ready.index(slot), (t // 2) & 1)
        l_s = lr_l.index(slot)
        if B_KMAJOR:
            r_op = r_op.permute((1, 0))
        if L_IN_REGS:
            l_op = l_s.load(l_reg_layout).to(gl.bfloat16)
            acc = warpgroup_mma(l_op, r_op, acc, use_acc=False, is_async=True)
        else:
            acc = warpgroup_mma(l_s, r_op, acc, use_acc=False, is_async=True)
        if HAS_BITS:
            # the keep bits are read while the low-rank wgmma runs
            if BITS_TMA:
                bits = lr_bits.index(slot).load(words_layout)  # 4 x ld.shared.v4 (128x128): the thread's own words
            else:
                # K % 128 != 0: TMA cannot address the bits (row stride K/8 bytes not 16-byte aligned), and
                # the rows are not word-aligned: bytes from global memory, straight into the bytes layout.
                offs_bm = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(2, bytes_layout)))
                offs_bw = gl.arange(0, BLOCK_N // 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, bytes_layout)))
                offs_bb = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, bytes_layout)))
                rows3 = gl.expand_dims(gl.expand_dims(offs_bm, 1), 2)
                q3 = off_n // 8 + gl.expand_dims(gl.expand_dims(offs_bw * 4, 0), 2) + \
                    gl.expand_dims(gl.expand_dims(offs_bb, 0), 0)
                bptrs = bits_ptr + rows3.to(gl.int64) * stride_bits + q3
                bits = gl.load(bptrs, mask=(rows3 < M) & (q3 < stride_bits), other=0)
        if L_IN_REGS:
            acc, l_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, l_op))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        if L_IN_REGS or (HAS_BITS and BITS_TMA):
            # ld.shared reads of the slot by all 4 warps must be done before the (single-thread) release
            gl.thread_barrier()
        mbarrier.arrive(lr_empty.index(slot))
        if HAS_BITS:
            acc = gl.where(keep_mask(bits, acc_layout, L4, ROWS, BLOCK_N, BITS_TMA), acc * lscale, 0.0)
        else:
            acc = acc * lscale

        # ---- main loop (ws_gemm._consumer's, with use_acc=True from the first step) --------------------
        mbarrier.wait(order.index(WG), (j & 1) ^ (1 - WG))
        prev_s = 0
        for kk in range(k_tiles):
            s = it % NUM_STAGES
            mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1)
            b = b_bufs.index(s)
            if B_KMAJOR:
                b = b.permute((1, 0))
            acc = warpgroup_mma(a_bufs.index(s), b, acc, use_acc=True, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index(prev_s), pred=kk > 0)
            prev_s = s
            it += 1
        mbarrier.arrive(order.index(1 - WG))  # the other warpgroup may start its main loop
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index(prev_s))
        it += k_tiles  # skip the other warpgroup's tile
        t += t_step
        j += 1

        # ---- epilogue ---------------------------------------------------------------------------------
        if HAS_BIAS:
            acc = acc + gl.expand_dims(bias.to(gl.float32), 0)
        n_store = _epilogue(c_desc, c_bufs, acc, n_store, row0, off_n, 2 * WG, ROWS, BLOCK_N)
    tma.store_wait(0)


@gluon.jit
def _lora_gemm_kernel(a_desc, b_desc, l_desc, r_desc, bits_desc, c_desc, bias_ptr, bits_ptr, stride_bits, r_ptr,
                      stride_r, R, lscale, M, N, K, B_KMAJOR: gl.constexpr, HAS_BIAS: gl.constexpr,
                      HAS_BITS: gl.constexpr, BITS_TMA: gl.constexpr, R_FP32: gl.constexpr, BLOCK_N: gl.constexpr,
                      GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      LOADER_REGS: gl.constexpr):
    """C[M,N] = A[M,K]·B (+ bias[N]) + lscale·(mask ⊙ L[M,r]·R) in one persistent warp-specialised kernel.
    base_expand: A = x, B = W [N,K] (B_KMAJOR), L = S, R = B[N,r] (K-major view), no bits.
    dx: A = dY, B = W as [N(reduction), K(out)], L = dS (fp32), R = A [r, K] (MN-major), keep bits optional."""
    gl.static_assert(BITS_TMA == 0 or HAS_BITS)
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES] + b_desc.block_type.shape, b_desc.layout)
    lr_l = gl.allocate_shared_memory(l_desc.dtype, [2] + l_desc.block_type.shape, l_desc.layout)
    RP: gl.constexpr = l_desc.block_type.shape[1]
    if R_FP32:  # bf16 slots the consumers fill themselves (r_desc is a placeholder)
        R_BOX: gl.constexpr = _pick(B_KMAJOR, [BLOCK_N, RP], [RP, BLOCK_N])
        lr_r = gl.allocate_shared_memory(gl.bfloat16, [2] + R_BOX,
                                         gl.NVMMASharedLayout.get_default_for(R_BOX, gl.bfloat16))
    else:
        lr_r = gl.allocate_shared_memory(r_desc.dtype, [2] + r_desc.block_type.shape, r_desc.layout)
    if BITS_TMA:
        lr_bits = gl.allocate_shared_memory(bits_desc.dtype, [2] + bits_desc.block_type.shape, bits_desc.layout)
    else:
        lr_bits = lr_l  # never read
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [4] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    lr_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    lr_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)
        mbarrier.init(lr_ready.index(i), count=1)  # the loader's expect-tx arrival
        mbarrier.init(lr_empty.index(i), count=1)  # the reading warpgroup's release
    fence_async_shared()

    gl.warp_specialize([
        (_lora_consumer, (a_bufs, b_bufs, ready, empty, order, lr_l, lr_r, lr_bits, lr_ready, lr_empty, c_desc, c_bufs,
                          bias_ptr, bits_ptr, stride_bits, r_ptr, stride_r, R, lscale, M, N, K, 0, B_KMAJOR, HAS_BIAS,
                          HAS_BITS, BITS_TMA, R_FP32, BLOCK_M, BLOCK_N, GROUP_M)),
        (_lora_consumer, (a_bufs, b_bufs, ready, empty, order, lr_l, lr_r, lr_bits, lr_ready, lr_empty, c_desc, c_bufs,
                          bias_ptr, bits_ptr, stride_bits, r_ptr, stride_r, R, lscale, M, N, K, 1, B_KMAJOR, HAS_BIAS,
                          HAS_BITS, BITS_TMA, R_FP32, BLOCK_M, BLOCK_N, GROUP_M)),
        (_lora_loader, (a_desc, b_desc, l_desc, r_desc, bits_desc, a_bufs, b_bufs, ready, empty, lr_l, lr_r, lr_bits,
                        lr_ready, lr_empty, M, N, K, B_KMAJOR, BITS_TMA, R_FP32, BLOCK_M, BLOCK_N, GROUP_M)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


_BLOCK_M, _BLOCK_N, _BLOCK_K, _GROUP_M, _CONSUMER_REGS, _LOADER_REGS = 128, 128, 64, 8, 232, 40
_STAGES_EPI = [(5, 64), (5, 32), (4, 64), (4, 32), (3, 64), (3, 32), (3, 16), (2, 32), (2, 16)]
"""(ring stages, epilogue chunk width) in order of preference: ring depth first (the epilogue hides
behind the other warpgroup's main loop, so narrower store chunks cost little)."""
_SMEM_MARGIN = 2048
"""Bytes kept free for barriers, warp-specialize state and the alignment of the extra buffers."""


def _stages_and_epi(rank_pad: int, l_bytes: int, bits_tma: bool) -> tuple[int, int]:
    """The first (stages, epi_n) of ``_STAGES_EPI`` whose shared memory fits (bytes as laid out above)."""
    low_rank = 2 * (_BLOCK_M * rank_pad * l_bytes + _BLOCK_N * rank_pad * 2 + (_BLOCK_M * _BLOCK_N // 8 if bits_tma else 0))
    for stages, epi in _STAGES_EPI:
        if _BLOCK_N // epi not in (1, 2, 4):
            continue
        ring = stages * (_BLOCK_M + _BLOCK_N) * _BLOCK_K * 2
        if ring + low_rank + 4 * _BLOCK_M * epi * 2 + _SMEM_MARGIN <= _SMEM_LIMIT:
            return stages, epi
    raise ValueError(f"no ring depth fits shared memory at rank {rank_pad}")


def _check_right(name: str, t: torch.Tensor, dims: tuple[str, str]) -> None:
    """B [N, r] or A [r, K]: bf16 as every TMA operand (``ws_gemm._check_operand``), or fp32, 2-D with sizes
    that are multiples of 8 (rounded to bf16 in the kernel, or by a cast first: ``_right_operand``)."""
    if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
        if t.dim() != 2 or any(size % 8 for size in t.shape):
            raise ValueError(f"{name} must be 2-D [{', '.join(dims)}] with sizes that are multiples of 8, got "
                             f"shape {tuple(t.shape)}")
        return
    _check_operand(name, t, dims)


def _check_low(name: str, low: torch.Tensor, m: int) -> None:
    """S or dS: a float32 or bfloat16 [M, r] tensor, row-major with 16-byte aligned rows, r supported
    (an fp32 one is rounded to bf16, as the Triton kernels round it: in the kernel where
    ``fp32_low_is_free``, else by a cast before the launch)."""
    if low.dim() != 2 or low.dtype not in (torch.float32, torch.bfloat16) or low.shape[0] != m:
        raise ValueError(f"{name} must be a float32 or bfloat16 [M={m}, r] tensor, got {low.dtype} {tuple(low.shape)}")
    check_rank(low.shape[1], SUPPORTED_RANKS, f"{name}.shape={tuple(low.shape)}")
    if not _tma_rows(low):
        raise ValueError(f"{name} must be row-major with 16-byte aligned rows, got strides {low.stride()}")


@functools.lru_cache(maxsize=None)
def fp32_low_is_free(r: int, bits_tma: bool = False) -> bool:
    """Whether an fp32 S or dS [M, r] (twice a bf16 one's shared memory) leaves the ring as deep as a bf16
    one would (with keep bits in shared memory when ``bits_tma``): then the kernel rounds it, with no
    separate cast. (Where it is not, the fp32 tile held in registers for its rounding also spills:
    r=64 dX took 523 / 972 µs at p=0 / with keep bits against 401 / 534 µs with dS cast first.)"""
    return _stages_and_epi(max(16, r), 4, bits_tma) == _stages_and_epi(max(16, r), 2, bits_tma)


MIN_DX_STAGES = 4
"""The shallowest ring at which the "gluon" set runs dX with keep bits here (``deep_ring``)."""


def deep_ring(r: int, *, bits_tma: bool) -> bool:
    """Whether a launch at rank ``r`` (low-rank operand in bf16, keep bits in shared memory when ``bits_tma``)
    keeps a ring of at least ``MIN_DX_STAGES`` slots. At r=64 with keep bits it has 3, and dX took 534 µs
    against 401 at p=0 (8192×4096×4096; the Triton set's layer was 1.39× base there against 1.51×)."""
    return _stages_and_epi(max(16, r), 2, bits_tma)[0] >= MIN_DX_STAGES


R_FP32_MAX_RANK = 32
"""The largest rank at which an fp32 B or A (PEFT's adapters) is rounded to bf16 in the kernel
(``store_r``: its tile is then at most 32 fp32 registers per consumer thread, beside the
accumulator); at r = 64 it is cast before the launch."""


def _right_operand(r_mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, bool]:
    """(the right low-rank operand to launch with, whether the kernel rounds it from fp32 itself)."""
    if r_mat.dtype == torch.float32:
        if rank <= R_FP32_MAX_RANK and r_mat.stride(1) == 1:
            return r_mat, True
        r_mat = r_mat.to(torch.bfloat16, memory_format=torch.contiguous_format)  # what the kernel's rounding gives
    return r_mat, False


Launch = tuple[tuple[int], tuple, dict, torch.Tensor]
"""(grid, arguments, constexprs, output) of one ``_lora_gemm_kernel`` launch."""


def _launch_args(a, b, l_mat, r_mat, b_kmajor: bool, out, bias, bits, lscale: float, m: int, n: int, k: int,
                 num_sms: int | None) -> Launch:
    """Descriptors and launch arguments of ``_lora_gemm_kernel`` for C[m, n] = A[m, k]·B (see its docstring)."""
    rank_pad = max(16, l_mat.shape[1])
    # bits [M, n/8] bytes through TMA need 16-byte aligned rows (n % 128 == 0)
    bits_tma = bits is not None and _tma_rows(bits)
    if l_mat.dtype != torch.bfloat16 and not fp32_low_is_free(l_mat.shape[1], bits_tma):
        l_mat = l_mat.to(torch.bfloat16)  # the values the kernel's own rounding would give
    stages, epi_n = _stages_and_epi(rank_pad, l_mat.element_size(), bits_tma)
    l_desc = _descriptor_of(l_mat, [_BLOCK_M, rank_pad])
    rank = l_mat.shape[1]
    r_mat, r_fp32 = _right_operand(r_mat, rank)
    r_desc = l_desc if r_fp32 else _descriptor_of(r_mat, [_BLOCK_N, rank_pad] if b_kmajor else [rank_pad, _BLOCK_N])
    # bits as int32 words [M, n/32]: each thread then reads whole words
    bits_desc = _descriptor_of(bits.view(torch.int32), [_BLOCK_M, _BLOCK_N // 32]) if bits_tma else l_desc
    args = (_descriptor_of(a, [_BLOCK_M, _BLOCK_K]),
            _descriptor_of(b, [_BLOCK_N, _BLOCK_K] if b_kmajor else [_BLOCK_K, _BLOCK_N]),
            l_desc, r_desc, bits_desc, _descriptor_of(out, [_BLOCK_M, epi_n]), bias if bias is not None else out,
            bits if bits is not None else out, bits.stride(0) if bits is not None else 0, r_mat, r_mat.stride(0), rank,
            float(lscale), m, n, k)
    constexprs = dict(B_KMAJOR=b_kmajor, HAS_BIAS=bias is not None, HAS_BITS=bits is not None, BITS_TMA=bits_tma,
                      R_FP32=r_fp32, BLOCK_N=_BLOCK_N, GROUP_M=_GROUP_M, NUM_STAGES=stages,
                      CONSUMER_REGS=_CONSUMER_REGS, LOADER_REGS=_LOADER_REGS)
    tiles = -(-m // _BLOCK_M) * -(-n // _BLOCK_N)
    grid = (max(1, min(num_sms or sm_count(a.device), tiles)),)
    return grid, args, constexprs, out


def bias_ok(bias: torch.Tensor | None, n: int) -> bool:
    """Whether the epilogue can add ``bias``: none, or a contiguous bf16 [n] vector."""
    return bias is None or (bias.dtype == torch.bfloat16 and tuple(bias.shape) == (n,) and bias.stride(0) == 1)


def _new_out(m: int, n: int, out_dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    if out_dtype != torch.bfloat16:
        raise ValueError(f"out_dtype={out_dtype} is not supported (the Gluon epilogue stores bfloat16)")
    return torch.empty(m, n, dtype=torch.bfloat16, device=like.device)


def prepare_base_expand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s_act: torch.Tensor,
                        lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype, *,
                        num_sms: int | None = None) -> Launch:
    """Checks and launch arguments of ``base_expand`` (host work only: with ``num_sms`` given it needs
    no GPU, e.g. for static compiles)."""
    _check_operand("x", x, ("M", "K"))
    _check_operand("weight", weight, ("N", "K"))
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight.shape={tuple(weight.shape)} must be [N, K={k}] (x is {tuple(x.shape)})")
    _check_low("s_act", s_act, m)
    r = s_act.shape[1]
    _check_right("lora_b", lora_b, ("N", "r"))
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b.shape={tuple(lora_b.shape)} must be [N={n}, r={r}]")
    if not bias_ok(bias, n):
        raise ValueError(f"bias must be a contiguous bfloat16 [N={n}] vector, got {bias.dtype} {tuple(bias.shape)}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale={scale} must be finite")
    check_same_device(x=x, weight=weight, s_act=s_act, lora_b=lora_b, bias=bias)
    out = _new_out(m, n, out_dtype, x)
    return _launch_args(x, weight, s_act, lora_b, True, out, bias, None, float(scale), m, n, k, num_sms)


def prepare_dx(dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_a: torch.Tensor, p: float,
               out_dtype: torch.dtype, *, keep_bits: torch.Tensor | None = None, num_sms: int | None = None) -> Launch:
    """Checks and launch arguments of ``dx`` (host work only, as ``prepare_base_expand``)."""
    _check_operand("dy", dy, ("M", "N"))
    _check_operand("weight", weight, ("N", "K"))
    m, n = dy.shape
    k = weight.shape[1]
    if weight.shape[0] != n:
        raise ValueError(f"weight.shape={tuple(weight.shape)} must be [N={n}, K] (dy is {tuple(dy.shape)})")
    _check_low("ds", ds, m)
    r = ds.shape[1]
    _check_right("lora_a", lora_a, ("r", "K"))
    if tuple(lora_a.shape) != (r, k):
        raise ValueError(f"lora_a.shape={tuple(lora_a.shape)} must be [r={r}, K={k}]")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p={p!r} is outside [0, 1)")
    if (p != 0.0) != (keep_bits is not None):
        raise ValueError(f"p={p} with keep_bits={'given' if keep_bits is not None else None}: the Gluon dx reads the "
                         "mask from da's keep bits, which exist exactly when p > 0")
    _check_bits(keep_bits, m, k, p, dy.device)
    check_same_device(dy=dy, weight=weight, ds=ds, lora_a=lora_a, keep_bits=keep_bits)
    out = _new_out(m, k, out_dtype, dy)
    return _launch_args(dy, weight, ds, lora_a, False, out, None, keep_bits, 1.0 / (1.0 - p), m, k, n, num_sms)


def _run(launch: Launch) -> torch.Tensor:
    grid, args, constexprs, out = launch
    launch_kernel(_lora_gemm_kernel, grid, args, constexprs, _OPTIONS)
    return out


def base_expand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s_act: torch.Tensor,
                lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """y = x Wᵀ + bias + scale·S Bᵀ -> [M, N] bf16: x [M, K], W [N, K], bias [N] or None, all bf16, B [N, r]
    and S [M, r] bf16 or fp32 (rounded to bf16 in the kernel, B up to ``R_FP32_MAX_RANK``); row-major with
    sizes that are multiples of 8 (r: 16-byte aligned rows); r in ``SUPPORTED_RANKS``."""
    return _run(prepare_base_expand(x, weight, bias, s_act, lora_b, scale, out_dtype))


def dx(dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_a: torch.Tensor, p: float,
       out_dtype: torch.dtype, *, keep_bits: torch.Tensor | None = None) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A)/(1-p) -> [M, K] bf16: dY [M, N], W [N, K] bf16; A [r, K] and dS [M, r] fp32
    or bf16 (rounded as in ``base_expand``); for p > 0 the mask comes from ``keep_bits`` (uint8 [M, K/8] as
    ``da`` wrote them: this kernel does not regenerate it from the seed)."""
    return _run(prepare_dx(dy, weight, ds, lora_a, p, out_dtype, keep_bits=keep_bits))
