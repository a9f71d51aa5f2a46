"""The dropout keep-mask, defined once, as a pure function of (seed, element offset).

Every implementation (the torch reference here, the Triton kernels in ``codegen``)
derives the mask from the same recipe, so the torch reference reproduces a GPU kernel's
mask bit for bit:

* element ``(i, j)`` of a row-major ``[M, K]`` activation has offset ``o = i*K + j``;
* ``q = o // 8`` is the counter of Philox-4x32 with ``PHILOX_ROUNDS`` (7) rounds
  (``c0 = q mod 2**32``, ``c1 = q >> 32``, ``c2 = c3 = 0``) and the int64 seed is the key
  (``k0`` = low, ``k1`` = high 32 bits), exactly as Triton's ``tl.randint4x(seed, q, 7)``;
* the four 32-bit words give eight 16-bit lanes; lane ``o % 8`` is
  ``(word[lane // 2] >> (16 * (lane % 2))) & 0xFFFF``;
* the element is kept when that lane ``>= drop_threshold(p) = round(p * 65536)``.

So the realised drop probability is ``round(p * 65536) / 65536`` (within 7.7e-6 of p),
and one Philox call serves eight elements.

The mask can be handed on as *keep bits* (``new_keep_bits``: uint8 ``[M, K/8]``, bit ``i`` of
byte ``(m, q)`` = keep of element ``(m, 8q + i)``; only when ``K % 8 == 0``): reading 1 bit per
element is cheaper than the ~15 integer operations per element of regenerating it. Inside one
backward the dA kernel, which regenerates the mask anyway, hands it to the dX kernel this way.
Where a kernel set says so (``saves_keep_bits``: the Gluon set) the forward's shrink stores them
instead and they are saved for the backward (M·K/8 bytes per layer call), so the mask is computed
once per step and dA and dX both read it.
"""

from __future__ import annotations

import torch

__all__ = ["KEEP_BITS_MAX_RANK", "LANES_PER_COUNTER", "PHILOX_ROUNDS", "drop_threshold", "keep_mask", "new_keep_bits",
           "one_bits_role", "pack_keep_bits", "philox4x32", "unpack_keep_bits", "write_keep_bits"]

LANES_PER_COUNTER = 8
"""Dropout decisions drawn from one Philox-4x32 call (eight 16-bit lanes)."""

PHILOX_ROUNDS = 7
"""Rounds of every Philox call of the mask. Salmon et al. (SC'11, "Parallel random numbers: as
easy as 1, 2, 3") found Philox-4x32 with 7 rounds free of failures in TestU01's BigCrush; 10 (the
Triton and cuRAND default) adds a safety margin. A dropout mask needs no more than BigCrush
quality, and the rounds are most of the mask's integer work: on H100 at 8192x4096 (bf16, p=0.1)
10 -> 7 rounds took shrink 38.7 -> 34.6 us and dA (with its keep-bits store) 54.0 -> 47.8 us."""

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def drop_threshold(p: float) -> int:
    """Integer threshold in [0, 65536): a 16-bit lane below it means "drop"."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p={p!r} is outside [0, 1)")
    return int(round(p * 65536))


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a*b >> 32, a*b mod 2**32) for a 32-bit constant a and uint32 values b held in int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48: exact in int64
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(seed: torch.Tensor, counter: torch.Tensor, rounds: int = PHILOX_ROUNDS) -> list[torch.Tensor]:
    """Philox-4x32 (``rounds`` rounds) on counters ``(counter lo, counter hi, 0, 0)`` keyed by an int64 seed.

    Args:
        seed: int64 tensor with one element (on any device).
        counter: int64 tensor of non-negative counters, any shape.
    Returns:
        The four output words, each an int64 tensor shaped like ``counter`` with
        values in [0, 2**32), equal to Triton's ``tl.randint4x(seed, counter, rounds)``.
    """
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def keep_mask(seed: torch.Tensor, p: float, rows: int, cols: int, *, device: torch.device | None = None) -> torch.Tensor:
    """The ``[rows, cols]`` boolean keep-mask of dropout probability ``p`` for ``seed``.

    ``p == 0`` keeps everything (no random numbers are drawn).
    """
    threshold = drop_threshold(p)
    device = seed.device if device is None else device
    if threshold == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    n = rows * cols
    n_counters = -(-n // LANES_PER_COUNTER)
    counter = torch.arange(n_counters, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(seed.to(device), counter), dim=-1)  # [n_counters, 4]
    lanes = torch.stack([words & 0xFFFF, words >> 16], dim=-1)  # [n_counters, 4, 2]
    lanes = lanes.reshape(-1)[:n].reshape(rows, cols)
    return lanes >= threshold


KEEP_BITS_MAX_RANK = 64
"""Largest LoRA rank whose backward hands the mask over as bits. H100, bf16, 8192x4096, p=0.1
(CUDA-graph replays): r=16: dA 46 -> 58 us (packing + storing 4 MiB of bits), dX 465 -> 425 us
(no Philox in its prologue): -28 us; r=128: dA 106 -> 120, dX 474 -> 471: +11 us (the rank
term, not the mask, dominates that prologue)."""


def new_keep_bits(x: torch.Tensor, p: float, rank: int) -> torch.Tensor | None:
    """An uninitialised keep-bits buffer (uint8 ``[M, K/8]``) for the [M, K] activation ``x`` of a
    LoRA layer of rank ``rank`` (multi-adapter: the largest), or None when there is no mask to hand
    over (``p == 0``), ``K % 8 != 0`` or ``rank > KEEP_BITS_MAX_RANK`` (bits do not pay off)."""
    m, k = x.shape
    if drop_threshold(p) == 0 or k % LANES_PER_COUNTER or rank > KEEP_BITS_MAX_RANK:
        return None
    return torch.empty(m, k // LANES_PER_COUNTER, dtype=torch.uint8, device=x.device)


def pack_keep_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[M, K]`` mask (K % 8 == 0) -> uint8 ``[M, K/8]`` keep bits (module docstring)."""
    m, k = mask.shape
    if k % LANES_PER_COUNTER:
        raise ValueError(f"keep bits need K % 8 == 0, got K={k}")
    lanes = mask.reshape(m, k // LANES_PER_COUNTER, LANES_PER_COUNTER).to(torch.int32)
    weights = 1 << torch.arange(LANES_PER_COUNTER, dtype=torch.int32, device=mask.device)
    return (lanes * weights).sum(-1).to(torch.uint8)


def unpack_keep_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 ``[M, K/8]`` keep bits -> boolean ``[M, K]`` mask."""
    shifts = torch.arange(LANES_PER_COUNTER, dtype=torch.int32, device=bits.device)
    return ((bits.to(torch.int32)[..., None] >> shifts) & 1).bool().reshape(bits.shape[0], -1)


def one_bits_role(keep_bits: torch.Tensor | None, stored_bits: torch.Tensor | None) -> None:
    """Raise unless at most one of dA's bits arguments is given: ``keep_bits`` (dA stores the mask there, for dX)
    or ``stored_bits`` (dA reads the mask shrink stored)."""
    if keep_bits is not None and stored_bits is not None:
        raise ValueError("keep_bits and stored_bits given together: dA either stores the mask (keep_bits) or reads "
                         "it (stored_bits, written by shrink); pass one")


def write_keep_bits(bits: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """Fill ``bits`` (uint8 ``[M, K/8]``) with the keep bits of the ``[M, K]`` mask of ``seed`` and ``p``,
    in torch (for kernels that cannot store them themselves)."""
    bits.copy_(pack_keep_bits(keep_mask(seed, p, bits.shape[0], bits.shape[1] * LANES_PER_COUNTER, device=bits.device)))
