"""Device pieces of the Gluon LoRA GEMMs' low-rank prologue (``lora_gemm``; Hopper, Triton 3.6 API): the
keep mask of a dX tile read from its keep bits in the accumulator's own layout, and an fp32 low-rank
right operand (PEFT's adapters) rounded to bf16 into a shared-memory slot for the wgmma."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared

from .ws_gemm import _pick

__all__ = ["bits_layout4", "keep_mask", "store_r"]


@gluon.constexpr_function
def bits_layout4(rows, cols):
    """The wgmma accumulator layout of a [rows, cols] tile (`ws_gemm._acc_layout(rows, cols)`, whose
    instruction N is `cols`) re-indexed as [rows, cols // 32, 4, 8]: column
    c = 32*w + 8*b + e -> (w, b, e), i.e. (32-bit word of keep bits, byte in the word, bit in the byte).
    Linear-layout bases of the accumulator (printed with gl.to_linear_layout for 128x128):
        reg  [0,1] [8,0] [0,8] [0,16] .. [0,cols/2] [16*num_warps,0] ..
        lane [0,2] [0,4] [1,0] [2,0] [4,0]       warp [16,0] [32,0] ..
    SliceLayout(2, SliceLayout(3, this)) is then the layout of the keep-bit words [rows, cols/32] whose
    bits the thread's own accumulator elements need (and SliceLayout(3, this) that of the bytes)."""
    num_warps = 4
    assert cols % 32 == 0 and cols <= 256 and rows % 64 == 0
    reg = [[0, 0, 0, 1], [8, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0]]
    c = 32
    while c < cols:
        reg.append([0, c // 32, 0, 0])
        c *= 2
    r = 16 * num_warps
    while r < rows:
        reg.append([r, 0, 0, 0])
        r *= 2
    lane = [[0, 0, 0, 2], [0, 0, 0, 4], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
    warp = [[16, 0, 0, 0], [32, 0, 0, 0]]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [rows, cols // 32, 4, 8])


@gluon.jit
def keep_mask(bits, acc_layout: gl.constexpr, L4: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr,
               WORDS: gl.constexpr):
    """Keep bits of a [ROWS, COLS] tile -> boolean keep mask [ROWS, COLS] in acc_layout, no data movement.
    WORDS: `bits` is int32 [ROWS, COLS/32] in SliceLayout(2, SliceLayout(3, L4)) (little-endian: byte b of
    word w = byte 4w + b); else uint8 [ROWS, COLS/32, 4] in SliceLayout(3, L4).
    Bit i of byte (m, q) = keep of column 8q + i (dropout_mask.pack_keep_bits)."""
    e = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L4))))
    e4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(e, 0), 0), 0)  # [1, 1, 1, 8]
    if WORDS:
        b = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(3, L4))))
        b4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(b, 0), 0), 3)  # [1, 1, 4, 1]
        w4 = gl.expand_dims(gl.expand_dims(bits, 2), 3)  # [ROWS, COLS/32, 1, 1]
        # per thread only 8 distinct masks (its 2 bit positions x 4 bytes), computed once
        keep4 = (w4 & (gl.full([1, 1, 4, 8], 1, gl.int32, L4) << (b4 * 8 + e4))) != 0
    else:
        by4 = gl.expand_dims(bits.to(gl.int32), 3)  # [ROWS, COLS/32, 4, 1]
        keep4 = (by4 & (gl.full([1, 1, 1, 8], 1, gl.int32, L4) << e4)) != 0
    keep = gl.reshape(keep4, [ROWS, COLS])
    # The reshape of L4 is the accumulator layout itself (checked while tracing).
    return gl.convert_layout(keep, acc_layout, assert_trivial=True)


@gluon.jit
def store_r(r_ptr, stride_r, dst, off_n, N, R, B_KMAJOR: gl.constexpr):
    """Round the tile of an fp32 low-rank right operand to bf16 into the shared-memory slot ``dst``, zeros
    beyond r and N: B [N, r] rows off_n.. into dst [BLOCK_N, RP] (B_KMAJOR), or A [r, N] columns off_n..
    into dst [RP, BLOCK_N]. The wgmma then reads it as it reads a TMA-loaded bf16 tile."""
    ROWS: gl.constexpr = dst.type.shape[0]
    COLS: gl.constexpr = dst.type.shape[1]
    TPW_COLS: gl.constexpr = _pick(COLS // 4 < 32, COLS // 4, 32)
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPW_COLS, TPW_COLS], [4, 1], [1, 0])
    rows = gl.expand_dims(gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout)), 1)
    cols = gl.expand_dims(gl.arange(0, COLS, layout=gl.SliceLayout(0, layout)), 0)
    if B_KMAJOR:
        rows = rows + off_n
        mask = (rows < N) & (cols < R)
    else:
        cols = cols + off_n
        mask = (rows < R) & (cols < N)
    tile = gl.load(r_ptr + rows.to(gl.int64) * stride_r + cols, mask=mask, other=0.0)
    dst.store(tile.to(gl.bfloat16))
    fence_async_shared()  # the generic-proxy stores, before the wgmma reads the slot
    gl.thread_barrier()  # every warp's part of the tile
