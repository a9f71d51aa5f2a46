"""Energy per call under sustained load: GEMMs one at a time, or whole training steps (GPU only).

An H200 running a training step sits at its power cap (~690 of 700 W, sixteenth session): there a
kernel's time is its energy ÷ the cap, so a kernel that is faster on a cool GPU but spends more
energy is slower in the step. This benchmark measures what the step pays: each call (a CUDA graph
of several GEMMs, or one training step) runs back to back for ``--seconds``, while a thread samples
the board power and SM clock through NVML every 50 ms; per phase it prints the median time per call
over the phase's second half, the mean watts and MHz there, and the energy per call (W × time).
Phases run in rounds (A B C … A B C …) so drift shows up as a difference between rounds.

    python benchmarks/power.py gemms                       # LLaMa-8B GEMMs at 4096 tokens: cuBLAS, tl, Gluon
    python benchmarks/power.py gemms --shapes 4096x4096x14336 --only cuBLAS gluon --seconds 4
    python benchmarks/power.py steps --layers 8 --p 0.0    # e2e.py's floor+cg and ours+cg training steps

Needs NVML's Python binding (``pip install nvidia-ml-py``; it imports as ``pynvml``).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from split_check import parse_shape

__all__ = ["Phase", "PowerSampler", "Sample", "energy_rows", "run_phase"]


@dataclass(frozen=True)
class Sample:
    """One NVML reading: wall time (s, ``time.time()``), board power (W), SM clock (MHz)."""

    t: float
    watts: float
    sm_mhz: float


@dataclass
class Phase:
    """One call timed back to back: its name, the wall-clock window (s) of its second half, and the
    GPU time of each call in that half (µs per call)."""

    name: str
    t0: float
    t1: float
    us_per_call: list[float] = field(default_factory=list)


class PowerSampler:
    """Context manager: a daemon thread reads NVML every ``period`` seconds into ``samples``."""

    def __init__(self, *, period: float = 0.05, device_index: int = 0) -> None:
        try:
            import pynvml
        except ImportError as err:
            raise RuntimeError("benchmarks/power.py needs NVML's Python binding: pip install nvidia-ml-py") from err
        self._nvml = pynvml
        self._period = period
        self._index = device_index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[Sample] = []

    def _run(self) -> None:
        nvml = self._nvml
        nvml.nvmlInit()
        handle = nvml.nvmlDeviceGetHandleByIndex(self._index)
        while not self._stop.is_set():
            t = time.time()
            self.samples.append(Sample(t, nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                                       nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)))
            self._stop.wait(max(0.0, self._period - (time.time() - t)))

    def __enter__(self) -> PowerSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def run_phase(name: str, call: Callable[[], object], *, seconds: float, calls_per_run: int = 1,
              sync_every: int = 5) -> Phase:
    """Run ``call`` back to back for about ``seconds``, synchronising every ``sync_every`` runs (so the host
    runs at most that far ahead of the GPU); returns the window from the first sync past the halfway
    point to the end, and the GPU µs per call (``calls_per_run`` calls per ``call()``) of the runs in it."""
    import torch

    start, events, window_start = time.time(), [], None
    while time.time() - start < seconds or window_start is None or len(events) == window_start[1]:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        events.append((begin, end))
        if len(events) % sync_every == 0:
            torch.cuda.synchronize()
            if window_start is None and time.time() - start >= seconds / 2:
                window_start = (time.time(), len(events))
    torch.cuda.synchronize()
    t0, first = window_start
    return Phase(name, t0, time.time(), [b.elapsed_time(e) * 1e3 / calls_per_run for b, e in events[first:]])


def energy_rows(phases: list[Phase], samples: list[Sample]) -> list[dict]:
    """Per phase: median µs per call, mean W and SM MHz of the samples inside its window, and energy per
    call (mJ = W × µs / 1000); ValueError if a window holds no sample (a phase shorter than the period)."""
    rows = []
    for phase in phases:
        inside = [s for s in samples if phase.t0 <= s.t <= phase.t1]
        if not inside:
            raise ValueError(f"no power sample inside phase {phase.name!r} ({phase.t1 - phase.t0:.3f} s): "
                             "run each phase longer (--seconds)")
        us = statistics.median(phase.us_per_call)
        watts = statistics.mean(s.watts for s in inside)
        rows.append(dict(name=phase.name, us=us, watts=watts, sm_mhz=statistics.mean(s.sm_mhz for s in inside),
                         mj=watts * us / 1e3))
    return rows


def _gemm_calls(shape: tuple[int, int, int], only: list[str] | None) -> dict[str, Callable[[], object]]:
    """cuBLAS, tl and (on Hopper) Gluon GEMMs of ``gemm_check.shape_calls`` for (M, K, N) whose names contain
    one of ``only`` (all when None), 20 per CUDA graph."""
    import torch
    from cuda_graph import replay_of_calls
    from gemm_check import shape_calls

    m, k, n = shape
    fwd, bwd, _ = shape_calls(m, k, n, gluon=torch.cuda.get_device_capability()[0] == 9)
    return {f"{m}x{k}x{n} {name}": replay_of_calls(fn, 20) for name, fn in {**fwd, **bwd}.items()
            if only is None or any(part in name for part in only)}


def _step_calls(layers: int, p: float, variants: list[str]) -> dict[str, Callable[[], object]]:
    """``e2e.py``'s training step of each variant (floors get p None), on fresh token ids each call."""
    import types

    import e2e

    ids = types.SimpleNamespace(tokens=4096, seq=1024)
    calls = {}
    for variant in variants:
        step = e2e.build_step(None if variant.startswith("floor") else p, variant, layers)
        for _ in range(3):  # compile, capture, warm
            step(e2e.new_ids(ids))
        calls[variant] = lambda step=step: step(e2e.new_ids(ids))
    return calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("gemms", "steps"))
    parser.add_argument("--shapes", type=parse_shape, nargs="+", metavar="MxKxN",
                        default=[(4096, 4096, 14336), (4096, 14336, 4096), (4096, 4096, 4096)], help="gemms: M x K x N")
    parser.add_argument("--only", nargs="+", default=None, help="gemms: keep the calls whose names contain one of these")
    parser.add_argument("--layers", type=int, default=8, help="steps: decoder layers")
    parser.add_argument("--p", type=float, default=0.0, help="steps: LoRA dropout of the ours variants")
    parser.add_argument("--variants", nargs="+", default=["floor+cg", "ours+cg"], help="steps: e2e.py variants")
    parser.add_argument("--seconds", type=float, default=2.5, help="per phase")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.seconds <= 0.2 or args.rounds < 1:
        parser.error(f"--seconds {args.seconds} must exceed 0.2 and --rounds {args.rounds} be >= 1")
    groups = ([_gemm_calls(shape, args.only) for shape in args.shapes] if args.what == "gemms"
              else [_step_calls(args.layers, args.p, args.variants)])
    per_run, sync_every = (20, 5) if args.what == "gemms" else (1, 3)
    phases = []
    with PowerSampler() as sampler:
        for calls in groups:
            for _ in range(args.rounds):
                phases += [run_phase(name, fn, seconds=args.seconds, calls_per_run=per_run, sync_every=sync_every)
                           for name, fn in calls.items()]
    unit = "us/call" if args.what == "gemms" else "us/step"
    print(f"{'phase':48s} {unit:>10s} {'W':>6s} {'SM MHz':>7s} {'mJ/call':>9s}")
    for row in energy_rows(phases, sampler.samples):
        print(f"{row['name']:48s} {row['us']:10.1f} {row['watts']:6.0f} {row['sm_mhz']:7.0f} {row['mj']:9.2f}")


if __name__ == "__main__":
    main()
