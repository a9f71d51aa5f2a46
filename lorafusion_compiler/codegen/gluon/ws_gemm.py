"""Persistent, warp-specialised bf16 GEMM for Hopper in Gluon (Triton 3.6 API).

    C[M, N] = A[M, R] · B        bf16 operands, fp32 accumulation, bf16 C

A is row-major [M, R]; B comes in the two layouts our fused GEMMs need:
``b_layout="nt"``: B given as W [N, R] (forward y = x·Wᵀ); ``b_layout="nn"``: B given as [R, N]
(backward dX = dY·W, W [N_out, K]).

One program per SM walks its tiles in GROUP_M order. A 1-warp loader partition streams A and B
boxes by TMA into a ``stages``-deep shared-memory ring (``ready``/``empty`` mbarrier per slot);
two 4-warp consumer warpgroups run async wgmma on the ring and store C through TMA. Variants:

* ``ws_coop``: both warpgroups share every BLOCK_M × BLOCK_N tile, BLOCK_M/2 rows each;
* ``ws_pingpong``: the warpgroups take alternate tiles; an mbarrier pair (``order``) alternates
  their main loops, so one warpgroup's epilogue overlaps the other's main loop.

Protocol facts this relies on (Gluon 3.6, checked in the PTX): one thread of a partition performs
an ``mbarrier.arrive``, so a slot is released per 4-warp partition (a wgmma is warpgroup-wide);
a fresh mbarrier counts as having completed the phase before phase 0, so the loader's first lap
(parity 1) passes at once; TMA credits the whole box to ``expect`` even where it is zero-filled
beyond the tensor's edge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
from ..kernels import _tma_rows
from ..launch import launch

__all__ = ["DEFAULT_CONFIGS", "GemmConfig", "gemm"]

_SMEM_LIMIT = 232448
"""Bytes of dynamic shared memory per block on sm_90 (227 KiB)."""


@dataclass(frozen=True, kw_only=True)
class GemmConfig:
    """Tile configuration of one GEMM launch."""

    variant: str = "ws_coop"
    """"ws_coop" (warpgroups share each tile) or "ws_pingpong" (alternate tiles)."""
    block_m: int = 128
    """Rows of C per tile (ws_coop: split in two halves of 64 rows, one per warpgroup)."""
    block_n: int = 256
    """Columns of C per tile, a multiple of 8 up to 256 (the wgmma N)."""
    block_k: int = 64
    """Reduction step per ring slot, a multiple of 16."""
    stages: int = 4
    """Ring slots (A and B boxes) in shared memory, >= 2."""
    group_m: int = 8
    """Row blocks walked column by column, so concurrent programs share A rows and B columns in L2."""
    epi_n: int = 64
    """Columns per TMA store of the epilogue (block_n / epi_n in {1, 2, 4})."""
    consumer_regs: int = 232
    """Registers per thread of each consumer warpgroup (``setmaxnreg``)."""
    loader_regs: int = 40
    """Registers per thread of the loader warp; 2·128·consumer + 128·loader must fit 65,536."""

    def __post_init__(self) -> None:
        if self.variant not in ("ws_coop", "ws_pingpong"):
            raise ValueError(f"variant={self.variant!r} must be 'ws_coop' or 'ws_pingpong'")
        for name in ("block_m", "block_n", "block_k", "stages", "group_m", "epi_n"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive int")
        if self.consumer_rows % 64:
            raise ValueError(f"block_m={self.block_m} gives {self.consumer_rows} rows per warpgroup; need a multiple of 64")
        if self.block_n % 8 or self.block_n > 256:
            raise ValueError(f"block_n={self.block_n} must be a multiple of 8 and <= 256")
        if self.block_k % 16:
            raise ValueError(f"block_k={self.block_k} must be a multiple of 16")
        if self.block_n % self.epi_n or self.block_n // self.epi_n not in (1, 2, 4):
            raise ValueError(f"epi_n={self.epi_n} must split block_n={self.block_n} into 1, 2 or 4 stores")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2")
        for name in ("consumer_regs", "loader_regs"):
            regs = getattr(self, name)
            if regs % 8 or not 24 <= regs <= 256:
                raise ValueError(f"{name}={regs} must be a multiple of 8 in [24, 256]")
        if 2 * 128 * self.consumer_regs + 128 * self.loader_regs > 65536:
            raise ValueError(f"consumer_regs={self.consumer_regs}, loader_regs={self.loader_regs} exceed the 65,536 registers of an SM")
        if self.smem_bytes + 1024 > _SMEM_LIMIT:
            raise ValueError(f"the config needs ~{self.smem_bytes} B of shared memory (limit {_SMEM_LIMIT}); lower stages={self.stages} or epi_n")

    @property
    def consumer_rows(self) -> int:
        """Rows of C one warpgroup owns per tile."""
        return self.block_m // 2 if self.variant == "ws_coop" else self.block_m

    @property
    def smem_bytes(self) -> int:
        """bf16 ring plus the epilogue's double-buffered store chunks (two per warpgroup)."""
        return 2 * (self.stages * (self.block_m + self.block_n) * self.block_k + 4 * self.consumer_rows * self.epi_n)


DEFAULT_CONFIGS = {
    "ws_coop": GemmConfig(),
    "ws_pingpong": GemmConfig(variant="ws_pingpong", block_n=128, stages=5),
}
"""The configs measured at cuBLAS parity on an H200 (both 1.00× over five LLaMa shapes)."""

_MODES = {"ws_coop": 0, "ws_pingpong": 1}


@gluon.constexpr_function
def _acc_layout(rows, cols):
    """wgmma accumulator layout of a [rows, cols] fp32 tile for one warpgroup (4 warps along M)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, cols, 16])


@gluon.constexpr_function
def _pick(flag, if_true, if_false):
    """``if_true if flag else if_false`` at trace time."""
    return if_true if flag else if_false


@gluon.jit
def _tile_offsets(tile_id, num_pid_m, num_pid_n, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """(row, column) of C where tile ``tile_id`` starts, in grouped order."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile_id // in_group) * GROUP_M
    group_rows = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + tile_id % group_rows
    pid_n = (tile_id % in_group) // group_rows
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, B_KMAJOR: gl.constexpr,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """TMA producer (1 warp): every k-step of every tile of this program, in ring order."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    it = 0
    for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        off_m, off_n = _tile_offsets(tile_id, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
        for kk in range(gl.cdiv(K, BLOCK_K)):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # slot released by its last readers
            bar = ready.index(s)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, kk * BLOCK_K], bar, a_bufs.index(s))
            if B_KMAJOR:
                tma.async_copy_global_to_shared(b_desc, [off_n, kk * BLOCK_K], bar, b_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(b_desc, [kk * BLOCK_K, off_n], bar, b_bufs.index(s))
            it += 1


@gluon.jit
def _halves(x, ROWS: gl.constexpr, COLS: gl.constexpr):
    """[ROWS, COLS] registers -> left and right [ROWS, COLS // 2] halves (no layout conversion)."""
    return gl.split(gl.permute(gl.reshape(x, [ROWS, 2, COLS // 2]), (0, 2, 1)))


@gluon.jit
def _store(c_desc, c_bufs, val, n_store, row, col, BUF0: gl.constexpr):
    """TMA-store one chunk through buffer BUF0 + n_store % 2; returns n_store + 1."""
    buf = c_bufs.index(BUF0 + n_store % 2)
    tma.store_wait(1)  # the store that last used this buffer has read it
    buf.store(val.to(c_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [row, col], buf)
    return n_store + 1


@gluon.jit
def _epilogue(c_desc, c_bufs, acc, n_store, row, col, BUF0: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr):
    """Store the [ROWS, COLS] accumulator in 1, 2 or 4 chunks of the descriptor's width."""
    EPI_N: gl.constexpr = c_desc.block_type.shape[1]
    if COLS == EPI_N:
        n_store = _store(c_desc, c_bufs, acc, n_store, row, col, BUF0)
    elif COLS == 2 * EPI_N:
        h0, h1 = _halves(acc, ROWS, COLS)
        n_store = _store(c_desc, c_bufs, h0, n_store, row, col, BUF0)
        n_store = _store(c_desc, c_bufs, h1, n_store, row, col + EPI_N, BUF0)
    else:
        gl.static_assert(COLS == 4 * EPI_N)
        h0, h1 = _halves(acc, ROWS, COLS)
        q0, q1 = _halves(h0, ROWS, COLS // 2)
        q2, q3 = _halves(h1, ROWS, COLS // 2)
        n_store = _store(c_desc, c_bufs, q0, n_store, row, col, BUF0)
        n_store = _store(c_desc, c_bufs, q1, n_store, row, col + EPI_N, BUF0)
        n_store = _store(c_desc, c_bufs, q2, n_store, row, col + 2 * EPI_N, BUF0)
        n_store = _store(c_desc, c_bufs, q3, n_store, row, col + 3 * EPI_N, BUF0)
    return n_store


@gluon.jit
def _consumer(a_bufs, b_bufs, ready, empty, order, c_desc, c_bufs, M, N, K, WG: gl.constexpr, PINGPONG: gl.constexpr,
              B_KMAJOR: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """One 4-warp consumer warpgroup (WG 0 or 1): async wgmma main loop, then the TMA-store epilogue."""
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    ROWS: gl.constexpr = BLOCK_M if PINGPONG else BLOCK_M // 2
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    if PINGPONG:  # this warpgroup's tiles are every other one of the program's, starting at WG
        first, step, it = pid + WG * nprog, 2 * nprog, WG * k_tiles
    else:
        first, step, it = pid, nprog, 0
    n_store = 0
    t = 0
    acc = gl.zeros([ROWS, BLOCK_N], gl.float32, _acc_layout(ROWS, BLOCK_N))
    for tile_id in range(first, num_pid_m * num_pid_n, step):
        off_m, off_n = _tile_offsets(tile_id, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
        if PINGPONG:
            # Start only after the other warpgroup passed its last `ready` wait of the previous tile:
            # main loops alternate, and each parity wait below can only match the intended phase.
            mbarrier.wait(order.index(WG), (t & 1) ^ (1 - WG))
        prev = 0
        for kk in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a = a_bufs.index(s)
            if not PINGPONG:
                a = a.slice(WG * ROWS, ROWS, dim=0)
            b = b_bufs.index(s)
            if B_KMAJOR:
                b = b.permute((1, 0))  # [N, K] box read K-major as the [K, N] operand
            acc = warpgroup_mma(a, b, acc, use_acc=kk > 0, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index(prev), pred=kk > 0)  # step kk-1's wgmma has read its slot
            prev = s
            it += 1
        if PINGPONG:
            mbarrier.arrive(order.index(1 - WG))
            it += k_tiles  # the other warpgroup's tile
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(prev))
        t += 1
        row = off_m if PINGPONG else off_m + WG * ROWS
        n_store = _epilogue(c_desc, c_bufs, acc, n_store, row, off_n, 2 * WG, ROWS, BLOCK_N)
    tma.store_wait(0)


@gluon.jit
def _gemm_kernel(a_desc, b_desc, c_desc, M, N, K, B_KMAJOR: gl.constexpr, PINGPONG: gl.constexpr,
                 BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                 CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """Default partition = consumer warpgroup 0; workers = consumer warpgroup 1, the loader warp."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [4] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1 if PINGPONG else 2)  # one arrive per warpgroup reading it
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)
    fence_async_shared()  # the inits before the TMA unit sees the barriers
    gl.warp_specialize([
        (_consumer, (a_bufs, b_bufs, ready, empty, order, c_desc, c_bufs, M, N, K, 0, PINGPONG, B_KMAJOR, BLOCK_M,
                     BLOCK_N, GROUP_M)),
        (_consumer, (a_bufs, b_bufs, ready, empty, order, c_desc, c_bufs, M, N, K, 1, PINGPONG, B_KMAJOR, BLOCK_M,
                     BLOCK_N, GROUP_M)),
        (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, B_KMAJOR, BLOCK_M, BLOCK_N, GROUP_M)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _check_operand(name: str, t: torch.Tensor, dims: tuple[str, str]) -> None:
    """bf16, 2-D, row-major, both sizes and the row stride multiples of 8 (16-byte TMA strides)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bfloat16 or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D torch.bfloat16 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    for dim, size in zip(dims, t.shape):
        if size % 8:
            raise ValueError(f"{dim}={size} ({name}.shape={tuple(t.shape)}) must be a multiple of 8: TMA needs 16-byte aligned rows")
    check_nonempty(name, t)
    if not _tma_rows(t):
        raise ValueError(f"{name} must be row-major with 16-byte aligned start and rows, got strides {t.stride()}")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    """Raise for a tensor with a zero size: TMA has no descriptor for it, so the Gluon kernels take
    non-empty operands only (the ``"gluon"`` kernel set sends empty ones to the Triton kernels)."""
    if t.numel() == 0:
        raise ValueError(f"{name}.shape={tuple(t.shape)} is empty: the Gluon kernels take non-empty operands "
                         f"(the \"gluon\" kernel set runs empty ones with the Triton kernels)")


def check_rows_operand(name: str, t: torch.Tensor, dims: tuple[str, str]) -> None:
    """A non-empty bf16 [dims] tensor streamed in row tiles by TMA: 2-D, row-major with 16-byte aligned rows,
    the inner size a multiple of 8 (the outer one any size)."""
    if t.dtype != torch.bfloat16 or t.dim() != 2 or t.shape[1] % 8 or not _tma_rows(t):
        raise ValueError(f"{name} must be a row-major 2-D bfloat16 [{dims[0]}, {dims[1]}] tensor with {dims[1]} % 8 == 0 "
                         f"and 16-byte aligned rows, got {t.dtype} {tuple(t.shape)} with strides {t.stride()}")
    check_nonempty(name, t)


def check_rank(r: int, supported: tuple[int, ...], source: str) -> None:
    """Raise unless rank ``r`` (read from ``source``, e.g. ``"lora_b.shape=(64, 12)"``) is one of ``supported``."""
    if r not in supported:
        raise ValueError(f"rank r={r} (from {source}) is not supported; expected one of {supported}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise unless the given tensors (None skipped) are on one device, naming each one's device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


def check_operands(a: torch.Tensor, b: torch.Tensor, b_layout: str) -> tuple[int, int, int]:
    """Validate the operands of ``gemm``; returns (M, N, R)."""
    if b_layout not in ("nt", "nn"):
        raise ValueError(f"b_layout={b_layout!r} must be 'nt' (b is W [N, R]) or 'nn' (b is [R, N])")
    _check_operand("a", a, ("M", "R"))
    m, r = a.shape
    _check_operand("b", b, ("N", "R") if b_layout == "nt" else ("R", "N"))
    n, rb = b.shape if b_layout == "nt" else b.shape[::-1]
    if rb != r:
        raise ValueError(f"a is [M, R] = {tuple(a.shape)} but b ({b_layout}) has R={rb}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device}, b on {b.device}")
    return m, n, r


_OPTIONS = {"num_warps": 4}
"""Launch options of the Gluon kernels: 4 warps is the default partition's (one warpgroup); the
worker partitions add theirs."""

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float32: gl.float32, torch.int32: gl.int32, torch.uint8: gl.uint8}


@functools.lru_cache(maxsize=None)
def _shared_layout(block: tuple[int, ...], dtype: torch.dtype):
    """The default swizzled shared layout of a ``block`` box of ``dtype`` (cached: building it takes ~6 µs of host time)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


def _descriptor_of(t: torch.Tensor, block: list[int]):
    """TMA descriptor of 2-D ``t`` for boxes of ``block``, with the default swizzled shared layout."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor(t, t.shape, t.stride(), block, _shared_layout(tuple(block), t.dtype))


def gemm(a: torch.Tensor, b: torch.Tensor, *, b_layout: str, out: torch.Tensor | None = None,
         config: GemmConfig | None = None) -> torch.Tensor:
    """C = A·B on a Hopper GPU: a [M, R] bf16, b as ``b_layout`` says ("nt": W [N, R]; "nn": [R, N]),
    out (optional) [M, N] bf16. All sizes multiples of 8. ``config`` defaults to ``DEFAULT_CONFIGS["ws_coop"]``."""
    m, n, r = check_operands(a, b, b_layout)
    cfg = config or DEFAULT_CONFIGS["ws_coop"]
    if not a.is_cuda or torch.cuda.get_device_capability(a.device)[0] != 9:
        raise ValueError(f"the Gluon GEMM needs a Hopper (sm_90) GPU; a is on {a.device}")
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    else:
        _check_operand("out", out, ("M", "N"))
        if tuple(out.shape) != (m, n):
            raise ValueError(f"out.shape={tuple(out.shape)} must be {(m, n)}")
    kmajor = b_layout == "nt"
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    grid = (max(1, min(sm_count(a.device), tiles)),)
    args = (_descriptor_of(a, [cfg.block_m, cfg.block_k]),
            _descriptor_of(b, [cfg.block_n, cfg.block_k] if kmajor else [cfg.block_k, cfg.block_n]),
            _descriptor_of(out, [cfg.consumer_rows, cfg.epi_n]), m, n, r)
    meta = dict(B_KMAJOR=kmajor, PINGPONG=cfg.variant == "ws_pingpong", BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
                STAGES=cfg.stages, CONSUMER_REGS=cfg.consumer_regs, LOADER_REGS=cfg.loader_regs)
    launch(_gemm_kernel, grid, args, meta, _OPTIONS)
    return out
