"""Run metrics: per-job loss and tokens/s, per-stage busy/idle time and bubble ratio.

Units: seconds, tokens, tokens per second. ``busy`` of a stage = time spent inside the
forward/backward compute of real microbatches (on a GPU: between CUDA events around each
region, so timing adds no host sync per microbatch); ``idle`` = window wall time - busy
(fill, drain, waits on other stages, optimizer steps, and the compute of padding
microbatches, which trains nothing); bubble ratio =
idle / wall (published definition: (step time - compute) / step time). Records go to ``<out_dir>/metrics-rank<r>.jsonl`` (one JSON object a line)
and to the ``lorafusion.pipeline`` logger.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["JobMeter", "MetricsLog", "StageClock"]

logger = logging.getLogger("lorafusion.pipeline")


class StageClock:
    """Accumulates compute seconds of one stage (``with clock.busy(): ...``).

    On a GPU each busy region is bracketed by two CUDA events on the current stream and the
    elapsed times are read at ``take`` (one wait per window, none per microbatch, so the host
    keeps queueing work ahead of the GPU); on a CPU it is host wall time.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.busy_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def busy(self) -> _Busy:
        return _Busy(self)

    def take(self) -> float:
        """Busy seconds since the last ``take`` (waits for the GPU work of the timed regions)."""
        if self._events:
            self._events[-1][1].synchronize()
            self.busy_s += sum(start.elapsed_time(end) for start, end in self._events) / 1e3
            self._events = []
        value, self.busy_s = self.busy_s, 0.0
        return value


class _Busy:
    def __init__(self, clock: StageClock):
        self.clock = clock
        self.cuda = clock.device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.events[0].record()
        else:
            self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            self.events[1].record()
            self.clock._events.append(self.events)
        else:
            self.clock.busy_s += time.perf_counter() - self.start
        return False


@dataclass
class JobMeter:
    """Per-job totals over the run."""

    tokens: int = 0
    """Real (unpadded) tokens trained."""
    seconds: float = 0.0
    """Wall seconds of the windows that held this job's tokens."""
    losses: list[float] = field(default_factory=list)
    """Mean token loss of every finished optimizer step, in order."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class MetricsLog:
    """JSONL writer + logger for per-window stage records and job-step records."""

    def __init__(self, out_dir: str | Path | None, rank: int):
        self.rank = rank
        self.path = Path(out_dir) / f"metrics-rank{rank}.jsonl" if out_dir is not None else None
        self.busy_s = 0.0
        self.wall_s = 0.0

    def write(self, record: dict) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def window(self, *, window: int, stage: int, microbatches: int, padding: int, tokens: int, next_round: int | None,
               busy_s: float, wall_s: float) -> dict:
        """Record window ``window`` (index within this ``pipeline`` call) of one stage: ``microbatches``
        run, ``padding`` of them empty, ``tokens`` real tokens; ``next_round``: rounds done after it
        (None inside a round)."""
        self.busy_s += busy_s
        self.wall_s += wall_s
        record = {"kind": "stage", "window": window, "stage": stage, "microbatches": microbatches, "padding": padding,
                  "tokens": tokens, "next_round": next_round, "wall_s": wall_s, "busy_s": busy_s,
                  "idle_s": max(0.0, wall_s - busy_s),
                  "bubble_ratio": max(0.0, 1.0 - busy_s / wall_s) if wall_s > 0 else 0.0}
        self.write(record)
        return record

    def job_step(self, *, job: str, step: int, loss: float, meter: JobMeter) -> dict:
        """Record job ``job`` finishing optimizer step ``step`` with mean token loss ``loss``."""
        record = {"kind": "job", "job": job, "step": step, "loss": loss, "tokens": meter.tokens, "tokens_per_s": meter.tokens_per_s}
        self.write(record)
        logger.info("job %s step %d loss %.4f (%.0f tokens/s)", job, step, loss, meter.tokens_per_s)
        return record

    @property
    def bubble_ratio(self) -> float:
        """Run-level bubble ratio of this stage: 1 - busy / wall."""
        return max(0.0, 1.0 - self.busy_s / self.wall_s) if self.wall_s > 0 else 0.0
