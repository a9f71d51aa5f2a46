"""Lazy per-job optimizer steps on one pipeline stage: clip by the global norm, then AdamW.

Job ``j``'s step ``t`` is complete on a stage once that stage ran the backward of the
step's last microbatch. Then (``after_backward``) the stage computes the squared L2 norm of
``j``'s gradient over its own parameters and starts an asynchronous all-reduce of it over all
stages, on a separate gloo process group (host tensors of a few floats: the default group
carries only the pipeline's P2P traffic, and no second NCCL communicator runs beside it).
Right before the stage's forward of the first microbatch of step ``t + 1``
(``before_forward``) it waits for the sum, clips with the global norm (the formula of
``torch.nn.utils.clip_grad_norm_``: coefficient min(1, max_norm / (norm + 1e-6))), steps
``j``'s AdamW and drops ``j``'s gradient. ``flush`` applies what is still pending at a window
end, so checkpoints and results see every finished step.

The window plan guarantees (``windows.py``) that the use comes >= S microbatches after the
step's end, so under 1F1B the backward has run on every stage before any stage needs the
step; if not, ``before_forward`` raises instead of waiting forever.

In-flight microbatches of other jobs hold every adapter's weights saved for their backward
(``multi_lora_linear`` saves all adapters; rows of absent jobs get zero gradients and never
read those weights), so the optimizers update weights through ``.data`` aliases: their
in-place writes do not bump the parameters' autograd version counters.

``keep_grads`` (used with CUDA graphs): the gradients a replayed backward graph returns live
in the graph's memory pool and are overwritten by the next replay, so autograd must not adopt
them as ``.grad``. Every gradient is then allocated (zeros) up front and zeroed in place after
its step instead of dropped, so autograd always adds into it in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .jobs import PipelineJob
from .windows import Step, Window

__all__ = ["LazySteps"]


@dataclass
class _Norms:
    """Squared gradient norms of the steps that finish at one microbatch (float32 [m]; on the host
    when all-reduced over stages, else on the parameters' device)."""

    sq: torch.Tensor
    index: dict[Step, int]
    work: Any = None
    """All-reduce handle over the stages (None once waited, or on a single stage)."""

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class LazySteps:
    """The optimizers of this stage's share of every job, stepped lazily (module docstring).

    params: job name -> this stage's trainable parameters of that job (may be empty);
    group: process group over all stages for the norm all-reduce (None on a single stage);
    keep_grads: keep every gradient allocated (module docstring).
    """

    def __init__(self, jobs: Sequence[PipelineJob], params: Mapping[str, list[nn.Parameter]], *,
                 group: dist.ProcessGroup | None, stage: int, keep_grads: bool = False):
        self.params = {job.name: list(params[job.name]) for job in jobs}
        self.keep_grads = keep_grads
        if keep_grads:
            for p in (p for ps in self.params.values() for p in ps):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.max_norm = {job.name: job.max_grad_norm for job in jobs}
        self.optimizers: dict[str, torch.optim.AdamW | None] = {
            job.name: torch.optim.AdamW([p.data for p in self.params[job.name]], lr=job.lr, betas=job.betas,
                                        weight_decay=job.weight_decay) if self.params[job.name] else None
            for job in jobs
        }
        """AdamW per job over ``.data`` aliases of its parameters (same order: checkpoints load as usual)."""
        self.steps_done = {job.name: 0 for job in jobs}
        """Optimizer steps applied per job."""
        self.group, self.stage = group, stage
        self._window: Window | None = None
        self._pending: dict[Step, _Norms] = {}
        self.applied: list[Step] = []
        """Steps applied since the last ``start``, in order."""

    def start(self, window: Window) -> None:
        """Begin running ``window`` (the previous one must have been flushed)."""
        if self._pending:
            raise RuntimeError(f"stage {self.stage}: steps {sorted(self._pending)} were never applied; call flush() at a window end")
        self._window, self.applied = window, []

    def after_backward(self, k: int) -> None:
        """The stage ran the backward of window microbatch ``k``: launch the norms of the steps ending there."""
        steps = self._window.finishes.get(k)
        if not steps:
            return
        sq = torch.zeros(len(steps), dtype=torch.float32, device=self._device())
        for i, (job, _) in enumerate(steps):
            grads = [p.grad for p in self.params[job] if p.grad is not None]
            if grads:
                sq[i] = torch.stack([torch.linalg.vector_norm(g) for g in grads]).pow(2).sum()
        # several stages: a host copy for the gloo all-reduce; one stage: stays on the device (no sync)
        norms = _Norms(sq=sq.cpu() if self.group is not None else sq, index={step: i for i, step in enumerate(steps)})
        if self.group is not None:
            norms.work = dist.all_reduce(norms.sq, group=self.group, async_op=True)
        for step in steps:
            self._pending[step] = norms

    def before_forward(self, k: int) -> None:
        """Apply the steps window microbatch ``k`` needs before its forward on this stage."""
        for job, step in self._window.requires.get(k, ()):
            if (job, step) not in self._pending:
                raise RuntimeError(
                    f"stage {self.stage}: window microbatch {k} starts step {step + 1} of job {job!r} before this stage "
                    f"ran the backward of step {step}'s last microbatch; the plan breaks the 1F1B distance rule "
                    "(a job's consecutive steps need >= S microbatches between them)")
            self._apply((job, step))

    def flush(self) -> list[Step]:
        """Apply every pending step (call after the window's last backward); return the steps applied in the window."""
        ends = {step: k for k, steps in self._window.finishes.items() for step in steps}
        missing = [step for step in ends if step not in self._pending and step not in self.applied]
        if missing:
            raise RuntimeError(f"stage {self.stage}: the backward of the last microbatch of steps {missing} never ran")
        for step in sorted(self._pending, key=lambda s: (ends[s], s)):
            self._apply(step)
        return list(self.applied)

    def _device(self) -> torch.device:
        for ps in self.params.values():
            if ps:
                return ps[0].device
        return torch.device("cpu")

    def _apply(self, step: Step) -> None:
        job, t = step
        if self.steps_done[job] != t:
            raise RuntimeError(f"stage {self.stage}: applying step {t} of job {job!r}, but {self.steps_done[job]} steps are done")
        norms = self._pending.pop(step)
        norms.wait()
        opt = self.optimizers[job]
        if opt is not None:
            params = self.params[job]
            if self.max_norm[job] is not None:
                coef = torch.clamp(self.max_norm[job] / (norms.sq[norms.index[step]].sqrt() + 1e-6), max=1.0)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.dtype))
            aliases = opt.param_groups[0]["params"]
            for alias, p in zip(aliases, params):
                alias.grad = p.grad
            opt.step()
            for alias in aliases:
                alias.grad = None
            if self.keep_grads:
                torch._foreach_zero_([p.grad for p in params if p.grad is not None])
            else:
                for p in params:
                    p.grad = None
        self.steps_done[job] += 1
        self.applied.append(step)
