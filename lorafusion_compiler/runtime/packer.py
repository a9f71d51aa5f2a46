"""Runtime packer: the scheduler's plan -> fixed-shape, adapter-tagged microbatches.

Layout of one microbatch (``C`` = capacity tokens, one fixed shape so pipelining works):

    input_ids     int64   [1, C]  samples back to back, grouped by job in job order; each
                                   job's segment starts at a multiple of ``pad_multiple``;
                                   padding tokens are 0
    position_ids  int64   [1, C]  0, 1, ... restarting at every sample; 0 on padding
    sample_ids    int64   [1, C]  index of the sample inside the microbatch, -1 on padding
                                   (attention is causal inside a sample only)
    labels        int64   [1, C]  next token inside the sample; -100 on padding and on
                                   each sample's last token
    weights       float32 [1, C]  1 / (target tokens of that job's optimizer step) on target
                                   tokens, 0 elsewhere: summing the weighted token losses of
                                   all microbatches of a step gives the job's mean token loss
    token_job     int64   [1, C]  job index of each token, -1 on padding (for metrics)
    adapter_rows  int64   [J, 2]  (first row, row count) per job = ``AdapterBatch`` table

An empty item list packs to an all-padding microbatch (window padding, see ``windows.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapter_batch import AdapterBatch
from .jobs import PipelineJob

__all__ = ["Item", "PackedMicrobatch", "block_causal_mask", "pack_microbatch", "plan_schedule", "scheduler_jobs"]

Item = tuple[str, int, int]
"""``(job_name, step, sample_index)`` as produced by the scheduler."""


@dataclass(kw_only=True)
class PackedMicrobatch:
    """One packed microbatch (shapes in the module docstring)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    sample_ids: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    token_job: torch.Tensor
    routing: AdapterBatch
    items: list[Item]
    job_tokens: dict[str, int] = field(default_factory=dict)
    """Real (unpadded) tokens per job in this microbatch."""

    def to(self, device: torch.device | str) -> PackedMicrobatch:
        """The same microbatch with every tensor on ``device``."""
        move = lambda t: t.to(device)
        return PackedMicrobatch(
            input_ids=move(self.input_ids), position_ids=move(self.position_ids), sample_ids=move(self.sample_ids),
            labels=move(self.labels), weights=move(self.weights), token_job=move(self.token_job),
            routing=self.routing.to(device), items=self.items, job_tokens=self.job_tokens,
        )


def pack_microbatch(items: Sequence[Item], jobs: Sequence[PipelineJob], *, capacity: int, pad_multiple: int) -> PackedMicrobatch:
    """Pack ``items`` into one [1, capacity] microbatch (empty ``items`` = all padding)."""
    index = {job.name: i for i, job in enumerate(jobs)}
    by_job: list[list[Item]] = [[] for _ in jobs]
    for item in sorted(items, key=lambda it: (index.get(it[0], -1), it[1], it[2])):
        if item[0] not in index:
            raise ValueError(f"microbatch item {item!r} names unknown job {item[0]!r}; jobs are {list(index)}")
        by_job[index[item[0]]].append(item)
    counts = [sum(jobs[j].lengths[it[2]] for it in its) for j, its in enumerate(by_job)]
    routing = AdapterBatch.from_counts(counts, pad_multiple=pad_multiple)
    if routing.total_rows > capacity:
        raise ValueError(f"items need {routing.total_rows} padded tokens, more than capacity={capacity}; raise capacity")
    input_ids = torch.zeros(capacity, dtype=torch.int64)
    position_ids = torch.zeros(capacity, dtype=torch.int64)
    sample_ids = torch.full((capacity,), -1, dtype=torch.int64)
    labels = torch.full((capacity,), -100, dtype=torch.int64)
    weights = torch.zeros(capacity, dtype=torch.float32)
    token_job = torch.full((capacity,), -1, dtype=torch.int64)
    sample_no = 0
    for j, its in enumerate(by_job):
        row = int(routing.adapter_rows[j, 0])
        job = jobs[j]
        for _, step, s in its:
            tokens = job.samples[s]
            n = tokens.numel()
            input_ids[row : row + n] = tokens
            position_ids[row : row + n] = torch.arange(n)
            sample_ids[row : row + n] = sample_no
            labels[row : row + n - 1] = tokens[1:]
            weights[row : row + n - 1] = 1.0 / job.step_target_tokens(step)
            token_job[row : row + n] = j
            row += n
            sample_no += 1
    view = lambda t: t.unsqueeze(0)
    return PackedMicrobatch(
        input_ids=view(input_ids), position_ids=view(position_ids), sample_ids=view(sample_ids), labels=view(labels),
        weights=view(weights), token_job=view(token_job), routing=routing, items=list(items),
        job_tokens={jobs[j].name: counts[j] for j in range(len(jobs)) if counts[j]},
    )


def block_causal_mask(sample_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask [1, 1, C, C] from ``sample_ids`` [1, C]: 0 where key <= query in the
    same sample (padding counts as one sample, so no row is fully masked), dtype-min elsewhere."""
    ids = sample_ids[0]
    c = ids.numel()
    causal = torch.ones(c, c, dtype=torch.bool, device=ids.device).tril()
    allowed = causal & (ids[:, None] == ids[None, :])
    mask = torch.zeros(c, c, dtype=dtype, device=ids.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def plan_schedule(jobs: Sequence[PipelineJob], *, capacity: int, pad_multiple: int, stages: int, **options) -> list[list[Item]]:
    """Run the scheduler on ``jobs`` and return its ordered microbatches as item lists (no-ops kept).

    ``options`` go to ``lorafusion_compiler.scheduler.schedule`` (``time_limit_s``, ``seed``, ``solver``...).
    """
    from ..scheduler import schedule

    plan = schedule(scheduler_jobs(jobs), capacity=capacity, pad_multiple=pad_multiple, stages=stages, **options)
    return [[tuple(item) for item in mb.items] for mb in plan.microbatches]


def scheduler_jobs(jobs: Sequence[PipelineJob]) -> list:
    """The scheduler's view (``scheduler.Job``) of pipeline jobs: lengths, batch size, steps."""
    from ..scheduler import Job

    return [
        Job(name=job.name, lengths=job.lengths, global_batch_size=job.global_batch_size, rank=job.rank,
            epochs=job.epochs_needed, max_steps=job.num_steps)
        for job in jobs
    ]
