"""``pipeline(base_model, jobs, ...)``: train many LoRA jobs at once on one frozen base model.

One process (no ``torch.distributed``): a plain loop over microbatches. Under ``torchrun``
with ``WORLD_SIZE = S`` > 1: rank ``s`` runs pipeline stage ``s`` (``PipelineStage`` +
``Schedule1F1B``, NCCL on GPU, gloo on CPU). Both paths use the same plan, packer, stage
modules and loss, so they train the same adapters.

Execution order (round-synchronous, see ``packer.plan_rounds``): the scheduler's ordered
microbatches are cut into rounds; each round is one ``Schedule1F1B`` step (fill, steady
1F1B, drain); after it, every job whose global batch finished clips its gradient (global
norm over all stages) and steps its AdamW. Loss: each target token of job ``j`` in step
``t`` weighs 1 / (target tokens of ``j`` in ``t``), summed (``scale_grads=False``), so each
job's gradient is that of its mean token loss over its global batch, as if trained alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    clean_uncommitted,
    load_checkpoint,
    read_state,
    save_checkpoint,
    write_json_atomic,
)
from .distributed import DistInfo, FailureWatch, init_distributed
from .jobs import PipelineJob, init_adapter_weights, validate_pipeline_jobs
from .metrics import JobMeter, MetricsLog, StageClock
from .multi_adapter import MultiAdapterModel
from .packer import Round, pack_microbatch, plan_rounds, plan_schedule
from .stages import (
    StageContext,
    StageModule,
    balance_stages,
    decoder_parts,
    layer_costs,
)

__all__ = ["PipelineResult", "TokenLoss", "build_multi_adapter_model", "pipeline"]

logger = logging.getLogger("lorafusion.pipeline")


@dataclass
class PipelineResult:
    """What one rank knows after ``pipeline`` returns."""

    model: nn.Module
    """The PEFT model holding every job's adapter (on a stage > 0 rank only its layers are trained)."""
    steps_done: dict[str, int]
    """Optimizer steps finished per job (including those before a resume)."""
    losses: dict[str, list[float]]
    """Mean token loss of every step finished in this call, per job."""
    tokens_per_s: dict[str, float]
    """Real tokens per wall second of the rounds that held the job (this call)."""
    bubble_ratio: float
    """This rank's stage: 1 - busy / wall over the rounds run."""
    next_round: int
    """First round not yet run (equals ``total_rounds`` when training finished)."""
    total_rounds: int
    stage: int
    num_stages: int
    stage_layers: list[tuple[int, int]] = field(default_factory=list)
    """Decoder-layer range [start, end) of every stage."""

    @property
    def finished(self) -> bool:
        return self.next_round >= self.total_rounds


class TokenLoss:
    """Weighted token cross-entropy: logits [1, C, V], target (labels [1, C], weights [1, C],
    token_job [1, C]) -> scalar sum(weight * CE). Keeps the detached per-job sums in ``acc`` [J]."""

    def __init__(self, num_jobs: int, device: torch.device):
        self.acc = torch.zeros(num_jobs, dtype=torch.float64, device=device)

    def reset(self) -> None:
        self.acc.zero_()

    def __call__(self, logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, weights, token_job = target
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none")
        weighted = token_loss * weights.reshape(-1)
        with torch.no_grad():
            jobs = token_job.reshape(-1)
            self.acc.index_add_(0, jobs.clamp(min=0), torch.where(jobs >= 0, weighted.detach(), 0.0).double())
        return weighted.sum()


def build_multi_adapter_model(base_model: nn.Module, jobs: Sequence[PipelineJob]) -> tuple[nn.Module, MultiAdapterModel]:
    """Wrap ``base_model`` (in place, PEFT) with one adapter per job, initialised from each job's
    ``init_seed``; return (peft model, the ``MultiAdapterModel`` routing its LoRA layers)."""
    from peft import get_peft_model

    peft_model = get_peft_model(base_model, jobs[0].lora_config(), adapter_name=jobs[0].name)
    for job in jobs[1:]:
        peft_model.add_adapter(job.name, job.lora_config())
    for job in jobs:
        init_adapter_weights(peft_model, job.name, job.init_seed)
    multi = MultiAdapterModel(peft_model, adapters=[job.name for job in jobs])
    peft_model.train()
    return peft_model, multi


def _plan(jobs, info: DistInfo, out: Path | None, resume: bool, capacity: int, pad_multiple: int, options: dict) -> list[list[tuple]]:
    if info.active:
        dirs = [None] * info.world_size
        dist.all_gather_object(dirs, None if out is None else str(out.resolve()))
        if len(set(dirs)) != 1:
            raise ValueError(f"ranks got different out_dir values {dirs}; pass the same folder (on a shared file system) to every rank")
    path = out / "schedule.json" if out is not None else None
    items = None
    if info.rank == 0:
        if out is not None:
            for stale in clean_uncommitted(out, [job.name for job in jobs]):
                logger.warning("removed %s (written after the last committed checkpoint)", stale)
        if resume and path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved["jobs"] != [job.name for job in jobs] or saved["capacity"] != capacity or saved["pad_multiple"] != pad_multiple:
                raise ValueError(f"{path} was planned for jobs {saved['jobs']} (capacity {saved['capacity']}, pad_multiple "
                                 f"{saved['pad_multiple']}); resume with the same jobs and settings or use a new out_dir")
            items = [[tuple(it) for it in mb] for mb in saved["microbatches"]]
        else:
            items = plan_schedule(jobs, capacity=capacity, pad_multiple=pad_multiple, stages=info.world_size, **options)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, {"jobs": [job.name for job in jobs], "capacity": capacity, "pad_multiple": pad_multiple,
                                         "stages": info.world_size, "microbatches": [[list(it) for it in mb] for mb in items]})
    if info.active:
        box = [items]
        dist.broadcast_object_list(box, src=0)
        items = box[0]
    return items


def _clip_and_step(finished: list[str], optimizers: dict, params: dict, jobs_by_name: dict, info: DistInfo, device) -> None:
    """Per-job gradient clipping (global L2 norm over all stages, like clip_grad_norm_) + AdamW step."""
    sq = torch.zeros(len(finished), dtype=torch.float32, device=device)
    for i, name in enumerate(finished):
        grads = [p.grad for p in params[name] if p.grad is not None]
        if grads:
            sq[i] = torch.stack([torch.linalg.vector_norm(g) for g in grads]).pow(2).sum()
    if info.active:
        dist.all_reduce(sq)
    for i, name in enumerate(finished):
        job, opt = jobs_by_name[name], optimizers[name]
        if opt is None:
            continue
        if job.max_grad_norm is not None:
            coef = torch.clamp(job.max_grad_norm / (sq[i].sqrt() + 1e-6), max=1.0)
            for p in params[name]:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)


def pipeline(
    base_model: nn.Module,
    jobs: Sequence[PipelineJob],
    *,
    capacity: int = 1024,
    pad_multiple: int = 16,
    out_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 1,
    max_rounds: int | None = None,
    compile: bool | None = None,
    stage_layers: Sequence[int] | None = None,
    schedule_options: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    timeout_s: float = 300.0,
    progress: bool = True,
    seed: int = 0,
    failure_grace_s: float = 10.0,
    fail_at_round: dict[int, int] | None = None,
) -> PipelineResult:
    """Train every job of ``jobs`` at once on ``base_model`` (frozen; wrapped with PEFT in place).

    capacity: tokens per microbatch (fixed shape [1, capacity]); pad_multiple: each job's
    segment starts at a multiple of this many tokens; out_dir: checkpoints + metrics (see
    ``checkpoint``); resume: continue from ``out_dir/state.json``; checkpoint_every: rounds
    between checkpoints (one is always written after the last round run); max_rounds: stop
    after this many rounds in this call (resume later); compile: ``torch.compile`` the stage
    with ``backend="lorafusion"`` (default: on CUDA only); stage_layers: decoder layers per
    stage (default: balanced by estimated cost); schedule_options: passed to the scheduler
    (``time_limit_s``, ``seed``, ``solver``); timeout_s: collective timeout (seconds);
    seed: round ``r`` runs with the torch RNG seeded from (seed, r) (dropout masks), so a run
    is reproducible and a resumed run equals an uninterrupted one; the caller's RNG state is
    restored on return; failure_grace_s: after another rank failed, seconds to wait for this
    rank's main thread to stop before the process exits with code 1; fail_at_round: test hook {rank: round} raising RuntimeError on that rank after that round.
    """
    jobs = validate_pipeline_jobs(jobs)
    for name, value in (("capacity", capacity), ("pad_multiple", pad_multiple), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if capacity % pad_multiple:
        raise ValueError(f"capacity={capacity} is not a multiple of pad_multiple={pad_multiple}; use e.g. {capacity // pad_multiple * pad_multiple + pad_multiple}")
    longest = max((max(job.lengths), job.name) for job in jobs)
    if longest[0] > capacity:
        raise ValueError(f"job {longest[1]!r} has a {longest[0]}-token sample, more than capacity={capacity}; raise capacity or truncate samples")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and not resume and read_state(out) is not None:
        raise ValueError(f"{out} already holds a checkpoint; pass resume=True to continue it or choose an empty out_dir")
    if resume and out is None:
        raise ValueError("resume=True needs out_dir (the folder holding state.json)")
    info = init_distributed(timeout_s=timeout_s, device=device)
    devices = [info.device] if info.device.type == "cuda" else []
    with FailureWatch(info, grace_s=failure_grace_s), torch.random.fork_rng(devices=devices):
        return _train(base_model, jobs, info, out=out, resume=resume, capacity=capacity, pad_multiple=pad_multiple,
                      checkpoint_every=checkpoint_every, max_rounds=max_rounds, compile=compile, stage_layers=stage_layers,
                      schedule_options=dict(schedule_options or {}), progress=progress, seed=seed,
                      fail_at_round=fail_at_round or {})


def _train(base_model, jobs, info: DistInfo, *, out, resume, capacity, pad_multiple, checkpoint_every, max_rounds, compile,
           stage_layers, schedule_options, progress, seed, fail_at_round) -> PipelineResult:
    S, stage, device = info.world_size, info.rank, info.device
    rounds: list[Round] = plan_rounds(_plan(jobs, info, out, resume, capacity, pad_multiple, schedule_options), min_microbatches=S)
    peft_model, _ = build_multi_adapter_model(base_model, jobs)
    parts = decoder_parts(peft_model)
    if stage_layers is not None:
        counts = list(stage_layers)
        if len(counts) != S or sum(counts) != len(parts.layers) or min(counts) < 1:
            raise ValueError(f"stage_layers={counts} must give {S} positive layer counts summing to {len(parts.layers)}")
        bounds, start = [], 0
        for c in counts:
            bounds.append((start, start + c))
            start += c
    else:
        tail = float(sum(p.numel() for p in parts.lm_head.parameters()))
        bounds = balance_stages(layer_costs(parts), S, tail_cost=tail)
    module = StageModule(parts, *bounds[stage], first=stage == 0, last=stage == S - 1).to(device)
    dtype = parts.embed.weight.dtype
    if compile if compile is not None else device.type == "cuda":
        module.compile_compute(backend="lorafusion")

    owned_ids = {id(p) for p in module.parameters()}
    named = dict(peft_model.named_parameters())
    params = {job.name: [p for n, p in named.items() if id(p) in owned_ids and f".{job.name}." in n and "lora_" in n] for job in jobs}
    optimizers = {job.name: torch.optim.AdamW(params[job.name], lr=job.lr, betas=job.betas, weight_decay=job.weight_decay)
                  if params[job.name] else None for job in jobs}
    steps_done = {job.name: 0 for job in jobs}
    start_round = 0
    if resume and read_state(out) is not None:
        state = load_checkpoint(out, peft_model=peft_model, optimizers=optimizers, stage=stage, device=device)
        start_round = state["next_round"]
        steps_done = {name: entry["steps_done"] for name, entry in state["jobs"].items()}
    expected = {job.name: 0 for job in jobs}
    for rnd in rounds[:start_round]:
        for name, _ in rnd.finished:
            expected[name] += 1
    if expected != steps_done:
        raise ValueError(f"checkpoint says steps {steps_done} but the plan finishes {expected} before round {start_round}; the checkpoint does not match this plan")

    clock = StageClock(device)
    log = MetricsLog(out, info.rank)
    loss_fn = TokenLoss(len(jobs), device)
    jobs_by_name = {job.name: job for job in jobs}
    job_index = {job.name: j for j, job in enumerate(jobs)}
    step_loss = torch.zeros(len(jobs), dtype=torch.float64, device=device)
    meters = {job.name: JobMeter() for job in jobs}
    schedules: dict[int, Any] = {}

    def schedule_for(n: int):
        if n not in schedules:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B

            class TimedStage(PipelineStage):
                def forward_one_chunk(self, *args, **kwargs):
                    with clock.busy():
                        return super().forward_one_chunk(*args, **kwargs)

                def backward_one_chunk(self, *args, **kwargs):
                    with clock.busy():
                        return super().backward_one_chunk(*args, **kwargs)

            # static shapes: no metadata-inference forward (which would consume a stage context)
            hidden = torch.empty(1, capacity, parts.embed.embedding_dim, dtype=dtype, device=device, requires_grad=True)
            logits = torch.empty(1, capacity, parts.lm_head.out_features, dtype=dtype, device=device, requires_grad=True)
            example_in = torch.zeros(1, capacity, dtype=torch.int64, device=device) if stage == 0 else hidden
            example_out = logits if stage == S - 1 else hidden
            pstage = TimedStage(module, stage, S, device, input_args=(example_in,), output_args=(example_out,))
            schedules[n] = Schedule1F1B(pstage, n, loss_fn=loss_fn, scale_grads=False)
        return schedules[n]

    end_round = len(rounds) if max_rounds is None else min(len(rounds), start_round + max_rounds)
    bar = None
    if progress and info.rank == 0 and end_round > start_round:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rounds), initial=start_round, desc="lorafusion pipeline", unit="round")
    for r in range(start_round, end_round):
        rnd = rounds[r]
        torch.manual_seed(seed * 1_000_003 + r)
        packed = [pack_microbatch(items, jobs, capacity=capacity, pad_multiple=pad_multiple) for items in rnd.microbatches]
        module.feed([StageContext.from_microbatch(mb, device=device) for mb in packed])
        targets = [(mb.labels.to(device), mb.weights.to(device), mb.token_job.to(device)) for mb in packed]
        loss_fn.reset()
        clock.take()
        t0 = time.perf_counter()
        if S == 1:
            for mb, target in zip(packed, targets):
                with clock.busy():
                    loss_fn(module(mb.input_ids.to(device)), target).backward()
        else:
            args = [(mb.input_ids.to(device),) for mb in packed] if stage == 0 else None
            last = stage == S - 1
            sched = schedule_for(len(packed))
            # what Schedule1F1B.step() does before _step_microbatches (private API, torch 2.11-2.13)
            sched._stage.has_backward = True
            sched._stage.clear_runtime_states()
            sched._step_microbatches(arg_mbs=args, target_mbs=targets if last else None, losses=[] if last else None, return_outputs=False)
        if module.consumed != len(packed):
            raise RuntimeError(f"stage {stage} ran {module.consumed} forwards for {len(packed)} microbatches")
        acc = loss_fn.acc.clone()
        if info.active:
            dist.all_reduce(acc)
        step_loss += acc
        finished = [name for name, step in rnd.finished]
        for name, step in rnd.finished:
            if step != steps_done[name]:
                raise RuntimeError(f"round {r} finishes step {step} of job {name!r}, but {steps_done[name]} steps are done")
        _clip_and_step(finished, optimizers, params, jobs_by_name, info, device)
        wall = time.perf_counter() - t0
        busy = clock.take()
        log.stage(round_index=r, stage=stage, busy_s=busy, wall_s=wall)
        round_tokens: dict[str, int] = {}
        for mb in packed:
            for name, n in mb.job_tokens.items():
                round_tokens[name] = round_tokens.get(name, 0) + n
        for name, n in round_tokens.items():
            meters[name].tokens += n
            meters[name].seconds += wall
        for name in finished:
            j = job_index[name]
            loss = float(step_loss[j])
            step_loss[j] = 0.0
            meters[name].losses.append(loss)
            if info.rank == 0:
                log.job_step(job=name, step=steps_done[name], loss=loss, meter=meters[name])
            steps_done[name] += 1
        if fail_at_round.get(info.rank) == r:
            raise RuntimeError(f"injected failure on rank {info.rank} after round {r}")
        if out is not None and ((r + 1 - start_round) % checkpoint_every == 0 or r + 1 == end_round):
            save_checkpoint(out, next_round=r + 1, steps_done=steps_done, peft_model=peft_model,
                            owned=lambda n: id(named[n]) in owned_ids, optimizers=optimizers, stage=stage, device=device,
                            barrier=(lambda: dist.barrier()) if info.active else (lambda: None),
                            gather=_gather(info))
        if bar is not None:
            bar.update(1)
            bar.set_postfix({name: f"{m.losses[-1]:.3f}" for name, m in meters.items() if m.losses})
    if bar is not None:
        bar.close()
    return PipelineResult(
        model=peft_model, steps_done=steps_done, losses={n: m.losses for n, m in meters.items()},
        tokens_per_s={n: m.tokens_per_s for n, m in meters.items()}, bubble_ratio=log.bubble_ratio,
        next_round=end_round, total_rounds=len(rounds), stage=stage, num_stages=S, stage_layers=list(bounds),
    )


def _gather(info: DistInfo):
    def gather(obj):
        if not info.active:
            return [obj]
        box = [None] * info.world_size if info.rank == 0 else None
        dist.gather_object(obj, box, dst=0)
        return box
    return gather
