"""Interleaved timing: the variants of one comparison are timed in rounds, one call each per round.

Timing variant A fully and then variant B puts them under different GPU clocks: on an H100 the
same cuBLAS GEMM measured 347 µs early in a process and 373-380 µs once the GPU had warmed up
(2026-11-23). A ratio of two variants timed one after the other then carries that drift. Called
round-robin, every variant sees the same mix of clocks, and each keeps its median.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["CudaEventTimer", "Timer", "WallTimer", "burn_in", "interleaved_ms", "interleaved_ratios"]


class Timer(Protocol):
    """Brackets one call; ``elapsed_ms`` is read after every call of the run was issued."""

    def start(self) -> Any: ...
    def stop(self, started: Any) -> Any: ...
    def elapsed_ms(self, stopped: Any) -> float: ...
    def wait(self) -> None: ...


class CudaEventTimer:
    """CUDA events around each call: GPU time of the work queued between them, no host sync per call."""

    def start(self) -> Any:
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started: Any) -> Any:
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return started, event

    def elapsed_ms(self, stopped: Any) -> float:
        start, end = stopped
        return start.elapsed_time(end)

    def wait(self) -> None:
        import torch

        torch.cuda.synchronize()


class WallTimer:
    """Host wall-clock time around each call (CPU runs and tests)."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, started: float) -> float:
        return (time.perf_counter() - started) * 1e3

    def elapsed_ms(self, stopped: float) -> float:
        return stopped

    def wait(self) -> None:
        pass


def _timed_rounds(calls: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int, timer: Timer | None,
                  shuffle: random.Random | None = None) -> list[dict[str, float]]:
    """Milliseconds of every call in each of the ``rounds`` counted rounds: ``warmup + rounds`` rounds
    call every entry once, in the mapping's order or, with ``shuffle``, a fresh order per round;
    the first ``warmup`` are not kept. Times are read once every call was issued."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    timer = CudaEventTimer() if timer is None else timer
    order = list(calls)
    marks: list[dict[str, Any]] = []
    for i in range(warmup + rounds):
        if shuffle is not None:
            shuffle.shuffle(order)
        round_marks = {}
        for name in order:
            started = timer.start()
            calls[name]()
            round_marks[name] = timer.stop(started)
        if i >= warmup:
            marks.append(round_marks)
    timer.wait()
    return [{name: timer.elapsed_ms(m) for name, m in round_marks.items()} for round_marks in marks]


def interleaved_ms(calls: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int = 3,
                   timer: Timer | None = None, seed: int | None = 0) -> dict[str, float]:
    """Median milliseconds per call of every entry of ``calls``, called round-robin.

    Each of ``warmup + rounds`` rounds calls every entry once, in a fresh random order (``seed``) or,
    with ``seed=None``, in the mapping's order; the first ``warmup`` rounds are not timed. A fixed
    order lets a neighbour bias an entry: on a power-capped GPU a step that follows a lighter one runs
    at higher clocks (H200, 8-layer training step: up to 0.015 of the floor's speed,
    ``docs/kernel-notes/end-to-end.md``, twentieth session). ``timer`` defaults to CUDA events.
    """
    shuffle = None if seed is None else random.Random(seed)
    timed = _timed_rounds(calls, rounds=rounds, warmup=warmup, timer=timer, shuffle=shuffle)
    return {name: statistics.median(r[name] for r in timed) for name in calls}


def interleaved_ratios(calls: Mapping[str, Callable[[], Any]], *, reference: str, rounds: int, warmup: int = 1,
                       timer: Timer | None = None, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per entry of ``calls``: (median, interquartile range) over rounds of its time ÷ the time of
    ``calls[reference]`` in the same round. Each round calls every entry once, in a fresh random
    order (``seed``), so neither clock drift nor a fixed neighbour favours an entry; the first
    ``warmup`` rounds are not counted. ``timer`` defaults to CUDA events.
    """
    if reference not in calls:
        raise ValueError(f"reference={reference!r} is not one of the calls {sorted(calls)}")
    timed = _timed_rounds(calls, rounds=rounds, warmup=warmup, timer=timer, shuffle=random.Random(seed))
    out = {}
    for name in calls:
        ratios = [r[name] / r[reference] for r in timed]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = (statistics.median(ratios), q[2] - q[0])
    return out


def burn_in(*, seconds: float = 1.0, size: int = 8192) -> int:
    """Keep the GPU busy with back-to-back bf16 ``size``³ GEMMs for about ``seconds`` of GPU time;
    returns how many ran.

    A training step keeps the GPU under sustained load, where an H200 runs power-capped: the same
    cuBLAS GEMM took 342 µs on a cool GPU and 400 µs after a few hundred GEMMs (2026-12-03). A
    timing taken right after compilation or a host-side pause sees the cool clocks, which favour
    the compute-bound kernels over the memory-bound ones; time after this call to see the
    sustained ones.
    """
    import torch

    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    timer = CudaEventTimer()
    started = timer.start()
    a @ a
    stopped = timer.stop(started)
    timer.wait()
    count = max(1, int(seconds * 1e3 / timer.elapsed_ms(stopped)))
    for _ in range(count):
        a @ a
    timer.wait()
    return count + 1
