"""Small per-kernel tile-configuration sets and a tuner cached per shape bucket.

On the GPU the first call of a (kernel, spec, shape bucket) times every configuration (CUDA
events around queued calls, cold L2, median, best of ``TUNE_ROUNDS`` interleaved rounds) and
keeps the fastest (the fused GEMMs, ``UNTIMED_KERNELS``, keep their first configuration that
fits); later calls only look the choice up, so nothing is host-synchronised per call. Under TRITON_INTERPRET=1 (no driver, no timing) and during CUDA-graph capture one fixed
configuration is used. ``LORAFUSION_TUNE_MAX=n`` limits tuning to the first n candidates
(quick benchmark runs: less compile time). Candidates whose operand ring alone would overflow the
GPU's shared memory (``ring_bytes``: fp32 operands in tiles sized for 16-bit ones) are tried only if
none of the others launches, so a fresh process does not compile kernels only to reject them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch

__all__ = ["SPLIT_KERNELS", "UNTIMED_KERNELS", "TileConfig", "cdiv", "configs", "grid_programs", "interpreting", "next_pow2",
           "num_sms", "run_tuned", "shape_bucket", "tuned_choices"]


@dataclass(frozen=True)
class TileConfig:
    """Block sizes (``tl.constexpr`` arguments) plus warps and pipeline stages of one launch."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 3
    persistent: bool = False
    """Launch one program per SM that walks the output tiles (GEMM templates with a tile loop)
    instead of one program per tile; not a kernel argument."""
    split_per_sm: int = 2
    """Split kernels (shrink, ds_db, dA): split the reduction so the grid has about this many
    programs per SM; not a kernel argument. More programs hide more latency (the dropout mask's
    Philox), fewer leave fewer partial sums."""
    meta: dict[str, int] = field(init=False, compare=False, repr=False)
    kwargs: dict[str, int] = field(init=False, compare=False, repr=False)
    """``kernel[grid](...)`` keyword arguments: the blocks plus num_warps and num_stages."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", dict(self.blocks))
        object.__setattr__(self, "kwargs", {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages})

    def __getitem__(self, name: str) -> int:
        return self.meta[name]

    def describe(self) -> str:
        """One line for reports, e.g. ``{'BLOCK_M': 128, ...} w8 s3 persistent``."""
        default = TileConfig.split_per_sm  # the split is named only when a config changes it
        split = f" split/SM {self.split_per_sm}" if self.split_per_sm != default else ""
        return f"{self.meta} w{self.num_warps} s{self.num_stages}{' persistent' if self.persistent else ''}{split}"


def _c(warps: int, stages: int, *, persistent: bool = False, split_per_sm: int = 2, **blocks: int) -> TileConfig:
    return TileConfig(tuple(blocks.items()), warps, stages, persistent, split_per_sm)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def configs(kernel: str, rank_bucket: int) -> tuple[TileConfig, ...]:
    """Candidate configurations of ``kernel`` for a padded rank (the first is the fallback)."""
    candidates = _configs(kernel, rank_bucket)
    if kernel in SPLIT_KERNELS and not interpreting():
        # the first config again with 1 and 4 programs per SM. H100, cold operands, µs (2 per SM ->
        # the better other): dA 4096x14336 84.9 -> 77.2 at 4, 8192x4096 47.7 -> 45.8 at 1; shrink
        # 8192x4096 34.2 -> 32.2 at 1; ds_db 1-2 µs faster at 1 (docs/kernel-notes/split-kernels.md)
        candidates += [dataclasses.replace(candidates[0], split_per_sm=n) for n in (1, 4)]
    return tuple(candidates)


SPLIT_KERNELS = ("shrink", "ds_db", "da")
"""Kernels that split their reduction over programs (``TileConfig.split_per_sm`` applies)."""


def _configs(kernel: str, rank_bucket: int) -> list[TileConfig]:
    if interpreting():  # few, large programs: interpreter time grows with the program count
        return [{
            "shrink": _c(4, 1, BLOCK_M=32, BLOCK_K=64),
            "lowrank_gemm": _c(4, 1, BLOCK_M=32, BLOCK_P=32, BLOCK_Q=64, GROUP_M=4, persistent=True),
            "ds_db": _c(4, 1, BLOCK_M=32, BLOCK_N=32),
            "da": _c(4, 1, BLOCK_M=32, BLOCK_K=64),
        }[_family(kernel)]]
    big = rank_bucket >= 128
    if kernel in ("base_expand", "dx"):
        # Not timed (UNTIMED_KERNELS): the first config that fits runs. The others are fallbacks where it
        # overflows shared memory (fp32 operands, large ranks): other tile shapes, smaller ones last. The
        # 128x256 tile with more stages, or launched per tile (the same kernel binary), could never run
        # where the persistent s3 one does not, so they are not listed
        return [
            _c(8, 3, BLOCK_M=128, BLOCK_P=256, BLOCK_Q=64, GROUP_M=8, persistent=True),
            _c(8, 3, BLOCK_M=256, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8),
            _c(8, 4, BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8),
            _c(4, 4, BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8),
        ]
    if kernel == "shrink":
        if big:
            return [_c(4, 3, BLOCK_M=32, BLOCK_K=64), _c(8, 3, BLOCK_M=64, BLOCK_K=64)]
        return [_c(4, 3, BLOCK_M=32, BLOCK_K=128), _c(4, 4, BLOCK_M=64, BLOCK_K=128), _c(8, 3, BLOCK_M=64, BLOCK_K=256),
                _c(8, 3, BLOCK_M=128, BLOCK_K=128)]
    if kernel == "ds_db":
        if big:
            return [_c(4, 3, BLOCK_M=64, BLOCK_N=64), _c(8, 3, BLOCK_M=64, BLOCK_N=128)]
        return [_c(8, 3, BLOCK_M=128, BLOCK_N=128), _c(8, 3, BLOCK_M=256, BLOCK_N=64), _c(8, 3, BLOCK_M=256, BLOCK_N=128),
                _c(4, 4, BLOCK_M=128, BLOCK_N=64)]
    if kernel == "da":
        if big:
            return [_c(4, 3, BLOCK_M=64, BLOCK_K=64), _c(8, 3, BLOCK_M=64, BLOCK_K=128)]
        # the unpipelined 32x128 tile: at p=0.1 the fastest dA alone and beside dX on H200 (M=4096, µs per
        # LLaMa-8B layer: 263 vs 301 for the first config alone; docs/kernel-notes/split-kernels.md); the
        # pipelined one at 2 and 4 programs per SM: dA with keep bits at 4096x14336 (the down projection's)
        # 77.4 -> 68.2 µs on H200, other shapes unchanged (fifteenth session)
        return [_c(4, 3, BLOCK_M=64, BLOCK_K=128), _c(8, 3, BLOCK_M=128, BLOCK_K=128), _c(8, 3, BLOCK_M=64, BLOCK_K=256),
                _c(4, 4, BLOCK_M=128, BLOCK_K=64), _c(8, 3, BLOCK_M=256, BLOCK_K=128), _c(4, 1, BLOCK_M=32, BLOCK_K=128),
                _c(4, 3, BLOCK_M=32, BLOCK_K=128), _c(4, 3, BLOCK_M=32, BLOCK_K=128, split_per_sm=4)]
    raise ValueError(f"unknown kernel {kernel!r}")


def _family(kernel: str) -> str:
    return "lowrank_gemm" if kernel in ("base_expand", "dx") else kernel


_CHOICES: dict[tuple, TileConfig] = {}


def tuned_choices() -> dict[tuple, TileConfig]:
    """The configurations chosen so far, keyed by (kernel, spec key, shape bucket)."""
    return dict(_CHOICES)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (``triton.cdiv`` is a constexpr function in recent Triton and
    costs ~10 µs per host call; launchers call this a dozen times per forward+backward)."""
    return -(-a // b)


@lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (a small stand-in under the interpreter, to exercise the split paths)."""
    if interpreting() or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def grid_programs(cfg: TileConfig, tiles: int, device: torch.device) -> int:
    """Programs to launch for ``tiles`` output tiles: one per tile, or (``cfg.persistent``) at most
    one per SM."""
    return min(tiles, num_sms(device)) if cfg.persistent else tiles


def next_pow2(v: int) -> int:
    """Smallest power of two >= v (1 for v <= 1), for host integers."""
    return 1 << max(0, v - 1).bit_length()


def shape_bucket(m: int) -> int:
    """Token counts are bucketed to the next power of two (feature sizes are used exactly)."""
    return next_pow2(m)


def ring_bytes(kernel: str, cfg: TileConfig, operand_bytes: int) -> int:
    """Shared memory of ``cfg``'s operand ring alone: ``num_stages`` slots of the main operands' tiles
    (GEMMs: [BLOCK_M, BLOCK_Q] and [BLOCK_Q, BLOCK_P]; split kernels: the x or dY tile), ``operand_bytes``
    each. A lower bound of what the compiled kernel asks for (low-rank tiles, barriers and the
    epilogue come on top)."""
    family = _family(kernel)
    if family == "lowrank_gemm":
        tile = cfg["BLOCK_Q"] * (cfg["BLOCK_M"] + cfg["BLOCK_P"])
    else:
        tile = cfg["BLOCK_M"] * cfg["BLOCK_N" if family == "ds_db" else "BLOCK_K"]
    return cfg.num_stages * tile * operand_bytes


def _split_by_predicted_fit(kernel: str, candidates: Sequence[TileConfig],
                            operand_bytes: int) -> tuple[list[TileConfig], list[TileConfig]]:
    """(candidates whose ``ring_bytes`` fit the GPU's shared memory, the others), each in the given order;
    all fit where there is nothing to measure against (interpreter, no GPU)."""
    limit = _smem_limit()
    fit = [c for c in candidates if limit is None or ring_bytes(kernel, c, operand_bytes) <= limit]
    return fit, [c for c in candidates if c not in fit]


def _smem_limit() -> int | None:
    """Shared memory one program may use on the current GPU, in bytes (None under the interpreter or
    without a GPU: nothing to order by)."""
    if interpreting() or not torch.cuda.is_available():
        return None
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "shared_memory_per_block_optin", None)


def run_tuned(kernel: str, spec_key: str, shape: tuple[int, ...], rank_bucket: int, launch: Callable[[TileConfig], Any],
              *, operand_bytes: int = 2) -> Any:
    """Run ``launch`` with the best configuration for (kernel, spec, shape bucket) and return its result.

    ``shape`` is (M, other dims...); M is bucketed. ``launch`` must be re-runnable (it
    allocates or zeroes its own outputs), since tuning calls it once per candidate.
    ``operand_bytes``: element size of the main operands (x, W, dY), for ``ring_bytes``.
    """
    key = (kernel, spec_key, shape_bucket(shape[0]), shape[1:])
    best = _CHOICES.get(key)
    if best is not None:
        return launch(best)
    fit, overflow = _split_by_predicted_fit(kernel, configs(kernel, rank_bucket), operand_bytes)
    everything = fit + overflow  # the estimate orders, it never removes a configuration
    candidates = fit or overflow
    limit = 1 if kernel in UNTIMED_KERNELS else int(os.environ.get("LORAFUSION_TUNE_MAX", "0") or 0)
    if limit > 0:  # untimed, or quick tuning (benchmark scripts): only the first ``limit`` candidates
        candidates = candidates[:limit]
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if len(candidates) == 1 or capturing:
        # nothing to choose, or no timing allowed inside a graph capture: the first config that fits;
        # kept when there was nothing to choose (a later call then skips the configs that did not
        # fit), not inside a capture (a later call outside it still tunes)
        cfg, result = _first_that_fits(everything, launch)
        if not capturing:
            _CHOICES[key] = cfg
        return result
    timings = [float("inf")] * len(candidates)
    for _ in range(TUNE_ROUNDS):
        for i, cfg in enumerate(candidates):
            if timings[i] != timings[i]:  # NaN: did not launch in an earlier round
                continue
            try:
                timings[i] = min(timings[i], _gpu_ms(lambda: launch(cfg)))
            except Exception:  # a configuration that does not fit (shared memory, registers) is skipped
                timings[i] = float("nan")
    valid = [i for i, t in enumerate(timings) if t == t]  # every round timed each one or set NaN
    if not valid:  # nothing launched: the first of all configurations that does (or the last error)
        best, result = _first_that_fits(everything, launch)
        _CHOICES[key] = best
        return result
    best = candidates[min(valid, key=timings.__getitem__)]
    _CHOICES[key] = best
    return launch(best)


UNTIMED_KERNELS = ("base_expand", "dx")
"""Kernels that take their first configuration that fits instead of the fastest one timed: the fused GEMMs,
whose first configuration is the persistent 128x256 tile. Timed on a cool GPU, the tuner picked one program
per tile for some shapes (k/v base_expand, q/o dX, the down projection's dX with keep bits); a training step
runs at the GPU's power cap, where time follows energy, and there the persistent tile for every GEMM ran the
8-layer step faster at p = 0.1 (speed ÷ floor 0.945 0.942 0.941 vs 0.939 0.939 0.938, three rounds) and level at
p = 0 (twenty-third session, H200; docs/kernel-notes/fused-gemms.md). The other GEMM configurations remain
fallbacks for operands whose tiles do not fit shared memory."""

TUNE_ROUNDS = 2
"""Candidates are timed in interleaved rounds and keep their best round: GPU clocks drift by up to
~10% over a tuning pass on H100, which decided between candidates when each was timed once."""


def _gpu_ms(fn: Callable[[], Any], *, calls: int = 8) -> float:
    """Median GPU milliseconds of one ``fn`` call with a cold L2, host launch time excluded.

    A spin kernel (``torch.cuda._sleep``) keeps the GPU busy while the host queues ``calls`` groups
    of (L2 flush, start event, ``fn``, end event), so each event pair brackets ``fn``'s kernels
    only, even when launching ``fn`` costs more host time than its kernels run: ``do_bench`` timed
    the small-M memory-bound kernels host-bound (~30-80 µs per launch on slow hosts), and their
    candidates tied. Events, not CUDA-graph replays: tuning runs inside autograd's backward and
    cudagraph-tree warm-ups, where a nested capture is fragile."""
    fn()  # compile and warm up outside the timed groups
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")  # per call: no cached tensor (graph pools)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    torch.cuda.synchronize()
    host = time.perf_counter()
    flush.zero_()
    fn()
    host = time.perf_counter() - host  # one group's host time (the queue is empty: no GPU time in it)
    torch.cuda._sleep(int(min(max(1.5 * calls * host, 1e-4), 0.5) * _SPIN_HZ))
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


_FLUSH_BYTES = 256 * 2**20
"""Zeroed before every timed call: larger than the L2 of current GPUs (50 MiB on H100)."""
_SPIN_HZ = 2.0e9
"""Clock ticks per second assumed when sizing the spin kernel (an upper bound: a slower clock
spins longer, which only delays the timed groups)."""


def _first_that_fits(candidates: Sequence[TileConfig], launch: Callable[[TileConfig], Any]) -> tuple[TileConfig, Any]:
    """(config, result) of the first candidate whose launch does not run out of shared memory or
    registers (Triton checks before anything runs, so a failed try has no effect); re-raises the
    last error."""
    from triton.runtime.errors import OutOfResources

    error: OutOfResources | None = None
    for cfg in candidates:
        try:
            return cfg, launch(cfg)
        except OutOfResources as exc:
            error = exc
    raise error
