"""``PipelineJob``: one LoRA fine-tuning job (adapter config, data, optimizer settings).

Samples are 1-D int64 token tensors (token ids), trained with next-token prediction inside
each sample: a sample of ``n`` tokens has ``n - 1`` target tokens. Job ``j``'s optimizer step
``t`` covers samples ``t*G .. t*G+G-1`` of its dataset (``G = global_batch_size``), in dataset
order, epochs replaying the dataset; the loss of a step is the mean token loss over all
target tokens of its samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PipelineJob", "init_adapter_weights", "validate_pipeline_jobs"]


def _positive_int(value: object, what: str, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}; {fix}")


@dataclass(kw_only=True)
class PipelineJob:
    """One adapter trained by :func:`lorafusion_compiler.runtime.pipeline.pipeline`."""

    name: str
    """Unique adapter name (also the checkpoint folder name); letters, digits, ``-`` and ``_``."""
    samples: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]]
    """1-D int64 token tensors, each >= 2 tokens: a list, a map-style dataset (``len`` + indexing)
    or an iterable (materialised once, kept in host memory), or a callable returning one (called once)."""
    global_batch_size: int
    """Samples per optimizer step (the last step of an epoch may hold fewer)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha (scaling = alpha / rank)."""
    dropout: float = 0.0
    """LoRA dropout probability in [0, 1)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Module names the adapter wraps; every job of one pipeline must use the same set."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    steps: int | None = None
    """Optimizer steps to train; ``None`` = ``epochs`` full passes over the samples."""
    epochs: int = 1
    """Passes over the samples when ``steps`` is None (also bounds ``steps``' data: steps wrap around)."""
    max_grad_norm: float | None = 1.0
    """Clip this job's gradient (global L2 norm over all its parameters on all stages); None = off."""
    init_seed: int = 0
    """Seed of the adapter initialisation (A: kaiming-uniform like PEFT, B: zeros)."""
    lengths: tuple[int, ...] = field(init=False, repr=False, default=())
    """Token count per sample (filled by validation)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"job name {self.name!r} must be a non-empty string of letters, digits, '-' or '_' (it names a folder)")
        if callable(self.samples):
            self.samples = self.samples()
        source = self.samples
        samples = [source[i] for i in range(len(source))] if hasattr(source, "__len__") and hasattr(source, "__getitem__") else list(source)
        if not samples:
            raise ValueError(f"job {self.name!r} has no samples; pass at least one 1-D token tensor")
        lengths = []
        for i, s in enumerate(samples):
            if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.dtype != torch.int64:
                got = f"{s.dtype} tensor of shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"sample {i} of job {self.name!r} is a {got}; samples must be 1-D int64 token tensors")
            if s.numel() < 2:
                raise ValueError(f"sample {i} of job {self.name!r} has {s.numel()} token(s); next-token training needs >= 2 tokens per sample, drop or merge it")
            lengths.append(int(s.numel()))
        self.samples = samples
        self.lengths = tuple(lengths)
        fix = "pass a positive integer"
        _positive_int(self.global_batch_size, f"global_batch_size of job {self.name!r}", fix)
        _positive_int(self.rank, f"rank of job {self.name!r}", fix)
        _positive_int(self.epochs, f"epochs of job {self.name!r}", fix)
        if self.steps is not None:
            _positive_int(self.steps, f"steps of job {self.name!r}", "pass a positive integer or None (= epochs over the data)")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha of job {self.name!r} is {self.alpha!r}; it must be a positive number (e.g. 2 * rank)")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout of job {self.name!r} is {self.dropout!r}; it must be in [0, 1)")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr of job {self.name!r} is {self.lr!r}; it must be a positive finite number such as 1e-4")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm of job {self.name!r} is {self.max_grad_norm!r}; use a positive number or None to disable clipping")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"target_modules of job {self.name!r} is {self.target_modules!r}; pass a non-empty tuple of module names such as ('q_proj', 'v_proj')")
        self.target_modules = tuple(self.target_modules)

    @property
    def steps_per_epoch(self) -> int:
        """ceil(samples / global_batch_size)."""
        return -(-len(self.lengths) // self.global_batch_size)

    @property
    def num_steps(self) -> int:
        """Optimizer steps this job trains."""
        return self.steps if self.steps is not None else self.steps_per_epoch * self.epochs

    @property
    def epochs_needed(self) -> int:
        """Passes over the data needed for ``num_steps`` steps."""
        return -(-self.num_steps // self.steps_per_epoch)

    def step_samples(self, step: int) -> range:
        """Dataset indices of the samples of optimizer step ``step`` (0-based)."""
        local = step % self.steps_per_epoch
        start = local * self.global_batch_size
        return range(start, min(start + self.global_batch_size, len(self.lengths)))

    def step_target_tokens(self, step: int) -> int:
        """Target tokens of step ``step``: sum of (length - 1) over its samples."""
        return sum(self.lengths[i] - 1 for i in self.step_samples(step))

    def lora_config(self) -> Any:
        """The ``peft.LoraConfig`` of this job's adapter."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.target_modules))


def validate_pipeline_jobs(jobs: Sequence[PipelineJob]) -> list[PipelineJob]:
    """Check a job list (non-empty, PipelineJob instances, unique names, same target modules)."""
    jobs = list(jobs)
    if not jobs:
        raise ValueError("no jobs given; pass a list with at least one PipelineJob")
    names = set()
    for job in jobs:
        if not isinstance(job, PipelineJob):
            raise ValueError(  # noqa: TRY004 - the runtime reports bad inputs as ValueError
                f"expected PipelineJob instances, got {type(job).__name__}; build jobs with PipelineJob(name=..., samples=..., ...)")
        if job.name in names:
            raise ValueError(f"job name {job.name!r} is used twice; job names must be unique")
        names.add(job.name)
    first = set(jobs[0].target_modules)
    for job in jobs[1:]:
        if set(job.target_modules) != first:
            raise ValueError(
                f"job {job.name!r} targets {sorted(job.target_modules)} but job {jobs[0].name!r} targets {sorted(first)}; "
                "all jobs of one pipeline must wrap the same modules"
            )
    return jobs


def init_adapter_weights(peft_model: torch.nn.Module, name: str, seed: int) -> None:
    """Deterministic init of adapter ``name``: A kaiming-uniform(a=sqrt 5) from ``seed`` in module order, B zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if f".{name}." not in pname or "lora_" not in pname:
                continue
            if "lora_A" in pname:
                bound = 1.0 / math.sqrt(param.shape[1])  # kaiming_uniform(a=sqrt(5)) bound for fan_in
                value = (torch.rand(param.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
                param.copy_(value.to(param.dtype))
            else:
                param.zero_()
