"""Run windows on this rank's pipeline stage: pack, feed, compute, lazy optimizer steps, losses.

S = 1: a plain loop (forward, weighted token loss, backward per microbatch). S > 1: one
``Schedule1F1B`` step (``scale_grads=False``) per window through the private
``_step_microbatches`` (torch 2.11-2.13; we first set what ``step()`` sets: ``has_backward``,
``clear_runtime_states``), on a ``PipelineStage`` subclass whose ``forward_one_chunk`` /
``backward_one_chunk`` call the same hooks as the plain loop:

- before the forward of window microbatch ``k``: apply the lazy optimizer steps ``k`` needs
  (``LazySteps.before_forward``), then seed the torch RNG with ``seed * 1000003 + p`` where
  ``p`` is the microbatch's plan position (dropout masks do not depend on windows, so a resumed
  run equals an uninterrupted one);
- after the backward of ``k``: launch the gradient norms of the steps ending at ``k``.

Forward/backward compute of real microbatches counts as busy time (``StageClock``); hooks,
optimizer steps and padding microbatches (computed, but useless) count as idle.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import DistInfo
from .jobs import PipelineJob
from .lazy_step import LazySteps
from .metrics import StageClock
from .packer import pack_microbatch
from .stages import StageContext, StageModule
from .windows import Step, Window

__all__ = ["StageRunner", "TokenLoss", "WindowRun"]


class TokenLoss:
    """Weighted token cross-entropy: logits [1, C, V], target (labels [1, C], weights [1, C],
    token_job [1, C]) -> scalar sum(weight * CE). Keeps each call's detached per-job sums
    (float64 [J]) in call order (= microbatch order)."""

    def __init__(self, num_jobs: int):
        self.num_jobs = num_jobs
        self.rows: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, weights, token_job = target
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none")
        weighted = token_loss * weights.reshape(-1)
        with torch.no_grad():
            jobs = token_job.reshape(-1)
            row = torch.zeros(self.num_jobs, dtype=torch.float64, device=logits.device)
            row.index_add_(0, jobs.clamp(min=0), torch.where(jobs >= 0, weighted.detach(), 0.0).double())
            self.rows.append(row)
        return weighted.sum()


@dataclass(kw_only=True)
class WindowRun:
    """What running one window gave this rank."""

    losses: list[list[float]]
    """[n][J]: weighted token-loss sum of each job in each window microbatch (same on every rank)."""
    applied: list[Step]
    """Optimizer steps applied during the window, in order."""
    job_tokens: dict[str, int]
    """Real tokens per job in the window."""
    busy_s: float
    """Seconds inside this stage's forward/backward compute."""
    wall_s: float
    """Seconds from the window's start to its last optimizer step and loss broadcast."""


@functools.cache
def _hooked_stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class HookedStage(PipelineStage):
        """``PipelineStage`` calling ``runner``'s hooks around every microbatch (chunk id = window index)."""

        runner: StageRunner

        def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
            self.runner.before_forward(fwd_chunk_id)
            with self.runner.timed(fwd_chunk_id):
                return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

        def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
            with self.runner.timed(bwd_chunk_id):
                result = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
            self.runner.after_backward(bwd_chunk_id)
            return result

    return HookedStage


class StageRunner:
    """Runs windows (``run``) on ``module``, this rank's stage of ``info.world_size``.

    capacity / pad_multiple: microbatch layout (``packer``); hidden_size / vocab_size / dtype:
    the static shapes sent between stages ([1, C, H] hidden states, [1, C, V] logits).
    """

    def __init__(self, module: StageModule, jobs: Sequence[PipelineJob], *, steps: LazySteps, info: DistInfo, clock: StageClock,
                 capacity: int, pad_multiple: int, seed: int, hidden_size: int, vocab_size: int, dtype: torch.dtype):
        self.module, self.jobs, self.steps, self.info, self.clock = module, list(jobs), steps, info, clock
        self.capacity, self.pad_multiple, self.seed = capacity, pad_multiple, seed
        self.shapes = (hidden_size, vocab_size, dtype)
        self.loss_fn = TokenLoss(len(jobs))
        self._window: Window | None = None
        self._schedule: tuple[int, object] | None = None

    def before_forward(self, k: int) -> None:
        """Hook before the forward of window microbatch ``k``: lazy steps, then the RNG seed."""
        self.steps.before_forward(k)
        position = self._window.positions[k]
        if position is not None:
            torch.manual_seed(self.seed * 1_000_003 + position)

    def after_backward(self, k: int) -> None:
        """Hook after the backward of window microbatch ``k``."""
        self.steps.after_backward(k)

    def timed(self, k: int) -> contextlib.AbstractContextManager:
        """Busy-time context for window microbatch ``k`` (padding is not counted)."""
        return self.clock.busy() if self._window.positions[k] is not None else contextlib.nullcontext()

    def run(self, window: Window) -> WindowRun:
        """Run every microbatch of ``window`` (forward + backward), then flush its optimizer steps."""
        device, S, n = self.info.device, self.info.world_size, len(window.microbatches)
        packed = [pack_microbatch(items, self.jobs, capacity=self.capacity, pad_multiple=self.pad_multiple) for items in window.microbatches]
        self.module.feed([StageContext.from_microbatch(mb, device=device) for mb in packed])
        targets = [(mb.labels.to(device), mb.weights.to(device), mb.token_job.to(device)) for mb in packed] if self.module.last else None
        self.loss_fn.rows = []
        self._window = window
        self.steps.start(window)
        self.clock.take()
        start = time.perf_counter()
        if S == 1:
            for k, (mb, target) in enumerate(zip(packed, targets)):
                self.before_forward(k)
                with self.timed(k):
                    self.loss_fn(self.module(mb.input_ids.to(device)), target).backward()
                self.after_backward(k)
        else:
            sched = self._schedule_for(n)
            sched._stage.has_backward = True  # what Schedule1F1B.step() sets before _step_microbatches
            sched._stage.clear_runtime_states()
            sched._step_microbatches(arg_mbs=[(mb.input_ids.to(device),) for mb in packed] if self.module.first else None,
                                     target_mbs=targets, losses=[] if self.module.last else None, return_outputs=False)
        if self.module.consumed != n:
            raise RuntimeError(f"stage {self.info.rank} ran {self.module.consumed} forwards for {n} microbatches")
        applied = self.steps.flush()
        losses = torch.stack(self.loss_fn.rows) if self.module.last else torch.zeros(n, len(self.jobs), dtype=torch.float64, device=device)
        if S > 1:
            dist.broadcast(losses, src=S - 1)
        wall = time.perf_counter() - start
        tokens: dict[str, int] = {}
        for mb in packed:
            for name, count in mb.job_tokens.items():
                tokens[name] = tokens.get(name, 0) + count
        return WindowRun(losses=losses.tolist(), applied=applied, job_tokens=tokens, busy_s=self.clock.take(), wall_s=wall)

    def _schedule_for(self, n: int):
        """The ``Schedule1F1B`` for ``n`` microbatches (one cached: torch sizes receive buffers per microbatch)."""
        if self._schedule is None or self._schedule[0] != n:
            from torch.distributed.pipelining import Schedule1F1B

            self._schedule = None  # free the previous stage's buffers first
            hidden_size, vocab_size, dtype = self.shapes
            device, stage, S = self.info.device, self.info.rank, self.info.world_size
            # static shapes: no metadata-inference forward (which would consume a stage context)
            hidden = torch.empty(1, self.capacity, hidden_size, dtype=dtype, device=device, requires_grad=True)
            logits = torch.empty(1, self.capacity, vocab_size, dtype=dtype, device=device, requires_grad=True)
            example_in = torch.zeros(1, self.capacity, dtype=torch.int64, device=device) if stage == 0 else hidden
            pstage = _hooked_stage_class()(self.module, stage, S, device, input_args=(example_in,),
                                           output_args=(logits if stage == S - 1 else hidden,))
            pstage.runner = self
            self._schedule = (n, Schedule1F1B(pstage, n, loss_fn=self.loss_fn, scale_grads=False))
        return self._schedule[1]
