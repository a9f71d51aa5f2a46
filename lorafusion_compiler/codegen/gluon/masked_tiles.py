"""Device pieces shared by the Gluon ``shrink``, ``da`` and ``ds_db``: a TMA ring of x tiles with a second operand,
and the dropout mask applied to an x tile in place (Hopper, Triton 3.6 API).

The mask is ``ops.dropout_mask``'s: counter (row·K + col) // 8, lane col % 8, Philox-4x32-7. An x tile
[ROWS, COLS] is read from its ring slot in ``x_layout`` (a thread holds the 8 columns of one counter,
so the counter's 8 lanes apply without moving data between threads), masked and written back, so
the slot itself becomes the wgmma operand. The mask depends only on the tile's offsets: consumers
compute it before waiting for the tile's data.

The mask's integer work bounds these kernels (they issue it faster than x streams in only at p = 0),
so it is kept to a few instructions per element: each Philox round is two 32×32→64-bit multiplies,
each word becomes a *keep word* (both 16-bit halves 0xFFFF or 0, one ``prmt``), a pair of bf16 is
masked by one ``and`` with its keep word, and the keep bits are gathered from the keep words with
masks and one shift (docs/kernel-notes/dropout-mask.md, sixteenth session). A tile whose keep bits were
stored earlier gets the same keep words from them in ~3 instructions each (``keep_words_of_bits``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from ...ops import dropout_mask

__all__ = ["ROUNDS", "keep_byte", "keep_words", "keep_words_of_bits", "mask_in_place", "ring_barriers", "ring_loader",
           "store_keep_bits", "x_layout", "x_layout3"]

ROUNDS = gl.constexpr(dropout_mask.PHILOX_ROUNDS)
"""Philox rounds of the mask (``dropout_mask.PHILOX_ROUNDS``)."""


@gluon.constexpr_function
def x_layout(rows, cols):
    """[rows, cols] x tile for one warpgroup: a thread holds 8 consecutive columns (one Philox counter) of a row."""
    return gl.BlockedLayout([1, 8], [32 // (cols // 8), cols // 8], [4, 1], [1, 0])


@gluon.constexpr_function
def x_layout3(rows, cols):
    """``x_layout`` reshaped to [rows, cols/8, 8]: the last dimension (a counter's 8 lanes) within the thread."""
    return gl.BlockedLayout([1, 1, 8], [32 // (cols // 8), cols // 8, 1], [4, 1, 1], [2, 1, 0])


@gluon.jit
def _philox(q, key0, key1, N_ROUNDS: gl.constexpr):
    """Philox-4x32-N_ROUNDS of the int64 counters q: the four words, as ``tl.randint4x(seed, q, N_ROUNDS)``."""
    c0 = q.to(gl.uint32)
    c1 = (q >> 32).to(gl.uint32)
    c2 = c0 * 0
    c3 = c2
    k0 = key0
    k1 = key1
    for _ in gl.static_range(N_ROUNDS):
        _c0 = c0
        _c2 = c2
        pb = _c2.to(gl.uint64) * 0xCD9E8D57  # one 32x32 -> 64-bit multiply gives both halves
        pa = _c0.to(gl.uint64) * 0xD2511F53
        c0 = (pb >> 32).to(gl.uint32) ^ c1 ^ k0
        c2 = (pa >> 32).to(gl.uint32) ^ c3 ^ k1
        c1 = pb.to(gl.uint32)
        c3 = pa.to(gl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


_KEEP_HALVES = gl.constexpr("""{
    .reg .b32 lo, hi;
    and.b32 lo, $1, 0xFFFF;
    sub.s32 lo, $2, lo;
    mul.hi.u32 hi, $1, 65536;
    sub.s32 hi, $2, hi;
    prmt.b32 $0, lo, hi, 0xFFBB;
}""")
"""Keep word of one Philox word ($1): half h of $0 is 0xFFFF iff lane h >= threshold, i.e. iff
(threshold - 1) - lane ($2 - lane) is negative: prmt's sign-replicating selector (nibbles B, F) copies the
sign bits of lo's and hi's top bytes over the two halves. The high lane comes from ``mul.hi`` (the
multiply pipe, which the shifts' pipe has less room for than it)."""

_FMA_SCALE = gl.constexpr(12345)
"""Odd multiplier of ``_KEEP_HALVES_FMA``: |(threshold - 1 - lane) · 12345| < 2³¹ keeps the sign, and ptxas
keeps a multiply by it an ``IMAD`` (a multiply by ±1 or a power of two becomes an add or a shift)."""

_KEEP_HALVES_FMA = gl.constexpr(f"""{{
    .reg .b32 hi, lo;
    mul.hi.u32 hi, $1, 65536;
    mad.lo.u32 lo, hi, {(_FMA_SCALE.value << 16) & 0xFFFFFFFF}, $2;
    mad.lo.u32 lo, $1, 0x{-_FMA_SCALE.value & 0xFFFFFFFF:X}, lo;
    mad.lo.u32 hi, hi, 0x{-_FMA_SCALE.value & 0xFFFFFFFF:X}, $2;
    prmt.b32 $0, lo, hi, 0xFFBB;
}}""")
"""``_KEEP_HALVES`` with its lane arithmetic on the multiply pipe: $2 = (threshold - 1)·c with c =
``_FMA_SCALE``; hi = lane 1; lo = $2 + c·65536·hi − c·w = $2 − c·lane 0 (mod 2³²: the immediates are
c·65536 and −c as u32), hi = $2 − c·lane 1; each is negative iff its lane >= threshold. Four ``IMAD`` and a ``PRMT``
instead of one ``IMAD`` and four integer-pipe instructions: the same keep words (bitwise), one pipe
traded for the other. Measured (H200, 8192×K, r=16, p=0.1, µs): shrink 27.8 → 26.4 (K=4096), 83.2 → 77.0
(K=14336); dA with keep bits 32.4 → 33.9 and 108.1 → 126.3, its multiply pipe being the busier one, so
dA keeps ``_KEEP_HALVES`` (twentieth session, ``docs/kernel-notes/dropout-mask.md``)."""


@gluon.jit
def _keep_halves(word, t, ON_FMA: gl.constexpr):
    """``_KEEP_HALVES_FMA`` (``ON_FMA``, t = (threshold - 1)·12345) or ``_KEEP_HALVES`` (t = threshold - 1) of
    each uint32 ``word`` (t int32, same shape)."""
    if ON_FMA:
        return gl.inline_asm_elementwise(_KEEP_HALVES_FMA, "=r,r,r", [word, t], dtype=gl.uint32, is_pure=True, pack=1)
    return gl.inline_asm_elementwise(_KEEP_HALVES, "=r,r,r", [word, t], dtype=gl.uint32, is_pure=True, pack=1)


@gluon.jit
def keep_words(seed_ptr, threshold, off_m, off_k, K, ROWS: gl.constexpr, COLS: gl.constexpr, ON_FMA: gl.constexpr):
    """Keep masks of the tile at (off_m, off_k) of an [M, K] activation, four uint32 [ROWS, COLS/8] (layout
    ``SliceLayout(2, x_layout3)``): half h of word j is 0xFFFF iff lane 2j + h (the 16-bit half h of Philox
    word j) is >= threshold, else 0. threshold >= 1. ``ON_FMA``: the lanes' arithmetic on the multiply pipe
    (``_KEEP_HALVES_FMA``), for kernels whose integer pipe is the busier one."""
    L3: gl.constexpr = x_layout3(ROWS, COLS)
    seed = gl.load(seed_ptr).to(gl.uint64)
    key0 = (seed & 0xFFFFFFFF).to(gl.uint32)
    key1 = ((seed >> 32) & 0xFFFFFFFF).to(gl.uint32)
    L2: gl.constexpr = gl.SliceLayout(2, L3)
    rows = off_m + gl.arange(0, ROWS, layout=gl.SliceLayout(1, L2))
    qs = off_k // 8 + gl.arange(0, COLS // 8, layout=gl.SliceLayout(0, L2))
    w0, w1, w2, w3 = _philox(gl.expand_dims(rows.to(gl.int64) * (K // 8), 1) + gl.expand_dims(qs, 0), key0, key1, ROUNDS)
    if ON_FMA:
        t = gl.full(w0.shape, 0, gl.int32, L2) + (threshold - 1) * _FMA_SCALE
    else:
        t = gl.full(w0.shape, 0, gl.int32, L2) + (threshold - 1)
    return (_keep_halves(w0, t, ON_FMA), _keep_halves(w1, t, ON_FMA), _keep_halves(w2, t, ON_FMA),
            _keep_halves(w3, t, ON_FMA))


@gluon.jit
def keep_byte(k0, k1, k2, k3):
    """The keep bits of a tile as bytes (uint8 [ROWS, COLS/8], layout ``SliceLayout(2, x_layout3)``; bit e =
    lane e, ``dropout_mask.pack_keep_bits``) from its keep words (``keep_words``). Word j gives bit 2j from its
    low half and bit 2j + 17 from its high one; folding the upper half-word onto the lower puts lane 2j + 1
    at bit 2j + 1."""
    u = (k0 & 0x00020001) | (k1 & 0x00080004) | (k2 & 0x00200010) | (k3 & 0x00800040)
    return ((u | (u >> 16)) & 0xFF).to(gl.uint8)


@gluon.jit
def store_keep_bits(k0, k1, k2, k3, bits_ptr, off_m, off_k, M, K, ROWS: gl.constexpr, COLS: gl.constexpr):
    """Store the tile's ``keep_byte`` into the uint8 [M, K/8] keep bits at (off_m, off_k / 8) with one global
    store per byte (for rows TMA cannot address: K % 128 != 0)."""
    byte = keep_byte(k0, k1, k2, k3)
    BL: gl.constexpr = gl.SliceLayout(2, x_layout3(ROWS, COLS))
    rows = off_m + gl.arange(0, ROWS, layout=gl.SliceLayout(1, BL))
    qs = off_k // 8 + gl.arange(0, COLS // 8, layout=gl.SliceLayout(0, BL))
    ptrs = bits_ptr + gl.expand_dims(rows.to(gl.int64) * (K // 8), 1) + gl.expand_dims(qs, 0)
    gl.store(ptrs, byte, mask=gl.expand_dims(rows < M, 1) & gl.expand_dims(qs < K // 8, 0))


@gluon.jit
def keep_words_of_bits(bits_slot, ROWS: gl.constexpr, COLS: gl.constexpr):
    """``keep_words`` of a tile from its stored keep bits (uint8 [ROWS, COLS/8] in shared memory, as
    ``store_keep_bits`` wrote them): bitwise the same four words, ~3 instructions each instead of Philox.
    u = b | b << 15 puts lane 2j at bit 2j and lane 2j + 1 at bit 2j + 16; (u >> 2j) & 0x10001 keeps those
    two, and · 0xFFFF spreads each over its 16-bit half."""
    BL: gl.constexpr = gl.SliceLayout(2, x_layout3(ROWS, COLS))
    b = bits_slot.load(BL).to(gl.uint32)
    u = b | (b << 15)
    return ((u & 0x00010001) * 0xFFFF, ((u >> 2) & 0x00010001) * 0xFFFF, ((u >> 4) & 0x00010001) * 0xFFFF,
            ((u >> 6) & 0x00010001) * 0xFFFF)


@gluon.jit
def mask_in_place(slot, k0, k1, k2, k3, ROWS: gl.constexpr, COLS: gl.constexpr):
    """x̃ = keep ? x : 0 for the bf16 x tile in shared-memory ``slot`` [ROWS, COLS], written back in place:
    one ``and`` per pair of bf16 (lanes 2j, 2j + 1 share keep word j, packed as one register)."""
    L2: gl.constexpr = x_layout(ROWS, COLS)
    L3: gl.constexpr = x_layout3(ROWS, COLS)
    x3 = gl.convert_layout(gl.reshape(slot.load(L2), [ROWS, COLS // 8, 8]), L3, assert_trivial=True)
    e3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3))), 0), 0)
    word = gl.where(e3 < 2, gl.expand_dims(k0, 2),
                    gl.where(e3 < 4, gl.expand_dims(k1, 2), gl.where(e3 < 6, gl.expand_dims(k2, 2), gl.expand_dims(k3, 2))))
    # pack=2: $1 holds the bf16 pair (2j, 2j + 1) of one thread, $2 and $3 their (equal) keep words
    x3 = gl.inline_asm_elementwise("and.b32 $0, $1, $2;", "=r,r,r,r", [x3, word], dtype=gl.bfloat16, is_pure=True,
                                   pack=2)
    slot.store(gl.convert_layout(gl.reshape(x3, [ROWS, COLS]), L2, assert_trivial=True))


@gluon.jit
def ring_barriers(STAGES: gl.constexpr):
    """(ready, empty): one mbarrier of each per ring slot, initialised and fenced. ready[s] completes when the
    loader's TMA copies into slot s have landed (its expect-tx arrival); empty[s] when the consumer has
    released the slot."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=1)
    fence_async_shared()
    return ready, empty


@gluon.jit
def ring_loader(x_desc, o_desc, x_bufs, o_bufs, ready, empty, fixed, first, stop, step, ALONG_ROWS: gl.constexpr,
                O_ROWS: gl.constexpr, bits_desc, bits_bufs, BITS_IN: gl.constexpr):
    """TMA producer (1 warp): for t = first, first + step, ... < stop, the x tile and the other operand's tile
    into ring slot i % STAGES. ALONG_ROWS (dA): x at [t·ROWS, fixed], other (dS [M, r]) at [t·ROWS, 0]; else
    x at [fixed, t·COLS] and the other at [0, t·COLS] (shrink: A [r, K]) or, O_ROWS, at [t·COLS, 0]
    (ds_db: B [N, r] beside dY [M, N] in x's place). ``BITS_IN`` (dA only): also the x tile's keep bits
    (uint8 [M, K/8], boxes [ROWS, COLS/8]) into ``bits_bufs``; without it those two are placeholders."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    ROWS: gl.constexpr = x_desc.block_type.shape[0]
    COLS: gl.constexpr = x_desc.block_type.shape[1]
    gl.static_assert(not BITS_IN or ALONG_ROWS)
    i = 0
    for t in range(first, stop, step):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # fresh barriers pass the first lap
        bar = ready.index(s)
        if BITS_IN:
            mbarrier.expect(bar, x_desc.block_type.nbytes + o_desc.block_type.nbytes + bits_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, x_desc.block_type.nbytes + o_desc.block_type.nbytes)
        if ALONG_ROWS:
            tma.async_copy_global_to_shared(x_desc, [t * ROWS, fixed], bar, x_bufs.index(s))
            tma.async_copy_global_to_shared(o_desc, [t * ROWS, 0], bar, o_bufs.index(s))
            if BITS_IN:
                tma.async_copy_global_to_shared(bits_desc, [t * ROWS, fixed // 8], bar, bits_bufs.index(s))
        else:
            tma.async_copy_global_to_shared(x_desc, [fixed, t * COLS], bar, x_bufs.index(s))
            if O_ROWS:
                tma.async_copy_global_to_shared(o_desc, [t * COLS, 0], bar, o_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(o_desc, [0, t * COLS], bar, o_bufs.index(s))
        i += 1
