"""Training jobs (one LoRA adapter each) and the mapping of their samples to optimizer steps.

Token counts are plain ints (tokens). A job's samples are assigned to optimizer steps in
dataset order: within one epoch, sample ``i`` belongs to step ``i // global_batch_size``.
The scheduler never moves a sample to another step, so a job trained inside a fused
multi-adapter schedule sees exactly the same global batches as when it is trained alone.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Item", "Job", "round_up", "validate_capacity", "validate_jobs"]

Item = tuple[str, int, int]
"""One scheduled sample: ``(job_name, step, sample_index)``."""


def round_up(tokens: int, multiple: int) -> int:
    """Round ``tokens`` up to the next multiple of ``multiple`` (both in tokens)."""
    return -(-tokens // multiple) * multiple


@dataclass(kw_only=True)
class Job:
    """One LoRA fine-tuning job sharing the frozen base model with the others.

    One epoch has ``ceil(len(lengths) / global_batch_size)`` optimizer steps; the last
    step of an epoch holds the remaining ``len(lengths) % global_batch_size`` samples
    when the dataset size is not a multiple of the global batch size. With ``epochs > 1``
    the dataset is replayed in the same order; ``max_steps`` truncates the run.
    """

    name: str
    """Unique job (adapter) name; it tags every scheduled sample."""
    lengths: Sequence[int]
    """Token count of every sample, in dataset order (tokens, each >= 1)."""
    global_batch_size: int
    """Samples per optimizer step (the last step of an epoch may hold fewer)."""
    rank: int = 16
    """LoRA rank r of the adapter (metadata for the runtime; it does not change packing)."""
    epochs: int = 1
    """How many times the dataset is traversed, in the same order each time."""
    max_steps: int | None = None
    """If set, only the first ``max_steps`` optimizer steps are scheduled."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"job name must be a non-empty string, got {self.name!r}")
        lengths = []
        for index, tokens in enumerate(self.lengths):
            try:
                count = operator.index(tokens)  # accepts numpy integers, rejects floats
            except TypeError:
                count = 0
            if isinstance(tokens, bool) or count < 1:
                raise ValueError(
                    f"sample {index} of job {self.name!r} has length {tokens!r}; "
                    "lengths must be positive integer token counts"
                )
            lengths.append(count)
        if not lengths:
            raise ValueError(
                f"job {self.name!r} has no samples (lengths is empty); "
                "give it at least one sample or leave the job out"
            )
        self.lengths = tuple(lengths)
        _require_positive_int(self.global_batch_size, f"global_batch_size of job {self.name!r}")
        _require_positive_int(self.rank, f"rank of job {self.name!r}")
        _require_positive_int(self.epochs, f"epochs of job {self.name!r}")
        if self.max_steps is not None:
            _require_positive_int(self.max_steps, f"max_steps of job {self.name!r}")

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the dataset: ceil(samples / global_batch_size)."""
        return -(-len(self.lengths) // self.global_batch_size)

    @property
    def num_steps(self) -> int:
        """Optimizer steps scheduled for this job (epochs and ``max_steps`` applied)."""
        total = self.steps_per_epoch * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)

    def step_samples(self, step: int) -> range:
        """Dataset indices of the samples trained in optimizer step ``step`` (0-based)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(
                f"step {step} is out of range for job {self.name!r}, which has "
                f"{self.num_steps} steps"
            )
        local = step % self.steps_per_epoch
        start = local * self.global_batch_size
        return range(start, min(start + self.global_batch_size, len(self.lengths)))

    def step_items(self, step: int) -> list[Item]:
        """The ``(job_name, step, sample_index)`` items of optimizer step ``step``."""
        return [(self.name, step, index) for index in self.step_samples(step)]

    def padded_length(self, sample_index: int, pad_multiple: int) -> int:
        """Tokens sample ``sample_index`` occupies once padded to ``pad_multiple`` tokens."""
        return round_up(self.lengths[sample_index], pad_multiple)

    def total_padded_tokens(self, pad_multiple: int) -> int:
        """Padded tokens over all scheduled steps (tokens)."""
        return sum(
            self.padded_length(index, pad_multiple)
            for step in range(self.num_steps)
            for index in self.step_samples(step)
        )


def _require_positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def validate_capacity(capacity: int, pad_multiple: int) -> None:
    """Check the token capacity per microbatch against the padding multiple (both tokens)."""
    _require_positive_int(pad_multiple, "pad_multiple")
    _require_positive_int(capacity, "capacity")
    if capacity % pad_multiple:
        lower = capacity // pad_multiple * pad_multiple
        upper = lower + pad_multiple
        suggestion = f"{upper}" if lower == 0 else f"{lower} or {upper}"
        raise ValueError(
            f"capacity={capacity} is not a multiple of pad_multiple={pad_multiple}; "
            f"use a capacity such as {suggestion}"
        )


def validate_jobs(jobs: Sequence[Job], capacity: int, pad_multiple: int) -> None:
    """Check a job list against the microbatch capacity (tokens); raise ValueError if unfit."""
    validate_capacity(capacity, pad_multiple)
    if not jobs:
        raise ValueError("no jobs given; pass at least one Job")
    seen: set[str] = set()
    for job in jobs:
        if not isinstance(job, Job):
            raise ValueError(f"expected Job instances, got {type(job).__name__}: {job!r}")
        if job.name in seen:
            raise ValueError(f"job name {job.name!r} is used twice; job names must be unique")
        seen.add(job.name)
        for index, tokens in enumerate(job.lengths):
            if tokens > capacity:
                raise ValueError(
                    f"sample {index} of job {job.name!r} has {tokens} tokens, more than "
                    f"capacity={capacity}; raise capacity or truncate samples"
                )
