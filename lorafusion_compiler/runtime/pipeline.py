"""``pipeline(base_model, jobs, ...)``: train many LoRA jobs at once on one frozen base model.

One process (no ``torch.distributed``): a plain loop over microbatches. Under ``torchrun``
with ``WORLD_SIZE = S`` > 1: rank ``s`` runs pipeline stage ``s`` (``PipelineStage`` +
``Schedule1F1B``, NCCL on GPU, gloo on CPU). Both paths use the same plan, packer, stage
modules, loss and lazy optimizer steps, so they train the same adapters.

Execution order (``windows.py``): the scheduler's ordered microbatches are cut into rounds
of whole optimizer steps (the unit of checkpoints and resume) and run in windows of up to
``window_microbatches`` microbatches, one ``Schedule1F1B`` step (one fill and drain) each.
Inside a window optimizer steps are lazy (``lazy_step.py``): each stage clips (global norm
over all stages) and steps job ``j``'s AdamW right before its first forward of ``j``'s next
step, so the other jobs' microbatches keep the pipeline busy meanwhile. Loss: each target
token of job ``j`` in step ``t`` weighs 1 / (target tokens of ``j`` in ``t``), summed
(``scale_grads=False``), so each job's gradient is that of its mean token loss over its
global batch, as if trained alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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
from .lazy_step import LazySteps
from .metrics import JobMeter, MetricsLog, StageClock
from .multi_adapter import MultiAdapterModel
from .packer import plan_schedule
from .stage_runner import StageRunner
from .stages import (
    DecoderParts,
    StageModule,
    balance_stages,
    decoder_parts,
    layer_costs,
)
from .windows import Step, plan_rounds, plan_windows

__all__ = ["DEFAULT_WINDOW_MICROBATCHES", "PipelineResult", "build_multi_adapter_model", "pipeline"]

logger = logging.getLogger("lorafusion.pipeline")

DEFAULT_WINDOW_MICROBATCHES = 64
"""Default window size with S > 1 stages. torch's ``PipelineStage`` allocates two [1, C, H]
receive buffers per microbatch of a window (activations and their gradients), so a window
of n microbatches holds 2n of them on a middle stage (64 MiB each at C = 8192, H = 4096, bf16)."""


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
    """Real tokens per wall second of the windows that held the job (this call)."""
    bubble_ratio: float
    """This rank's stage: 1 - busy / wall over the windows run."""
    next_round: int
    """First round not yet run (equals ``total_rounds`` when training finished)."""
    total_rounds: int
    stage: int
    num_stages: int
    stage_layers: list[tuple[int, int]] = field(default_factory=list)
    """Decoder-layer range [start, end) of every stage."""
    windows: int = 0
    """Windows run in this call (= pipeline fills and drains; ``_step_microbatches`` calls when S > 1)."""
    padding_microbatches: int = 0
    """Empty microbatches run in this call (distance rule and minimum window length)."""

    @property
    def finished(self) -> bool:
        return self.next_round >= self.total_rounds


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


def _positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer" + (" or None" if allow_none else ""))


def pipeline(
    base_model: nn.Module,
    jobs: Sequence[PipelineJob],
    *,
    capacity: int = 1024,
    pad_multiple: int = 16,
    out_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    window_microbatches: int | None = None,
    max_rounds: int | None = None,
    compile: bool | None = None,
    cudagraphs: bool | None = None,
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
    between checkpoints (windows end there); None = after every window that ends a round
    (one is always written after the last round run); window_microbatches: most microbatches
    per pipeline fill/drain (default ``DEFAULT_WINDOW_MICROBATCHES`` with S > 1; with S = 1,
    where nothing fills or drains, one round per window); max_rounds: stop after this many
    rounds in this call (resume later); compile: ``torch.compile`` the stage with
    ``backend="lorafusion"`` (default: on CUDA only); cudagraphs: record the compiled stage's
    forward and backward as CUDA graphs and replay them (the backend option ``cudagraphs``;
    removes the host cost of every kernel launch); default: on when the stage is compiled on
    CUDA with one stage; needs CUDA, compilation and S = 1 (ValueError otherwise);
    stage_layers: decoder layers per stage (default: balanced by estimated cost); schedule_options: passed to the scheduler
    (``time_limit_s``, ``seed``, ``solver``); timeout_s: collective timeout (seconds);
    seed: the forward of plan microbatch ``p`` runs with the torch RNG seeded from (seed, p)
    (dropout masks), so a run is reproducible and a resumed run equals an uninterrupted one
    (bitwise on CPU; on CUDA, kernels that sum with atomic adds make them agree to rounding);
    the caller's RNG state is restored on return; failure_grace_s: after another rank failed,
    seconds to wait for this rank's main thread to stop before the process exits with code
    1; fail_at_round: test hook {rank: round} raising RuntimeError on that rank after that
    round (a window ends there).
    """
    jobs = validate_pipeline_jobs(jobs)
    for name, value in (("capacity", capacity), ("pad_multiple", pad_multiple)):
        _positive_int(name, value)
    for name, value in (("checkpoint_every", checkpoint_every), ("window_microbatches", window_microbatches), ("max_rounds", max_rounds)):
        _positive_int(name, value, allow_none=True)
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
    if window_microbatches is not None and window_microbatches < info.world_size:
        raise ValueError(f"window_microbatches={window_microbatches} is below the {info.world_size} pipeline stages; 1F1B needs >= {info.world_size}")
    compile = compile if compile is not None else info.device.type == "cuda"
    cudagraphs = _check_cudagraphs(cudagraphs, compile=compile, info=info)
    devices = [info.device] if info.device.type == "cuda" else []
    with FailureWatch(info, grace_s=failure_grace_s), torch.random.fork_rng(devices=devices):
        return _train(base_model, jobs, info, out=out, resume=resume, capacity=capacity, pad_multiple=pad_multiple,
                      checkpoint_every=checkpoint_every, window_microbatches=window_microbatches, max_rounds=max_rounds,
                      compile=compile, cudagraphs=cudagraphs, stage_layers=stage_layers,
                      schedule_options=dict(schedule_options or {}),
                      progress=progress, seed=seed, timeout_s=timeout_s, fail_at_round=fail_at_round or {})


def _check_cudagraphs(cudagraphs: bool | None, *, compile: bool, info: DistInfo) -> bool:
    """Resolve ``pipeline``'s ``cudagraphs`` (None: on wherever it is supported)."""
    supported = compile and info.device.type == "cuda" and info.world_size == 1
    if cudagraphs is None:
        return supported
    if not isinstance(cudagraphs, bool):
        raise ValueError(f"cudagraphs={cudagraphs!r} must be a bool or None")
    if cudagraphs and not supported:
        raise ValueError(
            f"cudagraphs=True needs a compiled stage on CUDA and one stage; got compile={compile}, device={info.device}, "
            f"{info.world_size} stages (CUDA graphs are not supported inside multi-stage 1F1B yet): pass cudagraphs=False")
    return cudagraphs


def _build_stage(base_model: nn.Module, jobs: Sequence[PipelineJob], info: DistInfo, stage_layers: Sequence[int] | None,
                 compile: bool, cudagraphs: bool) -> tuple[nn.Module, DecoderParts, StageModule, list[tuple[int, int]]]:
    """PEFT-wrap ``base_model`` and cut this rank's stage; returns (peft model, its parts, stage module, layer ranges)."""
    S = info.world_size
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
    module = StageModule(parts, *bounds[info.rank], first=info.rank == 0, last=info.rank == S - 1).to(info.device)
    if compile:
        module.compile_compute(backend="lorafusion", options={"cudagraphs": cudagraphs})
    return peft_model, parts, module, bounds


def _train(base_model, jobs, info: DistInfo, *, out, resume, capacity, pad_multiple, checkpoint_every, window_microbatches,
           max_rounds, compile, cudagraphs, stage_layers, schedule_options, progress, seed, timeout_s, fail_at_round) -> PipelineResult:
    S, stage, device = info.world_size, info.rank, info.device
    rounds = plan_rounds(_plan(jobs, info, out, resume, capacity, pad_multiple, schedule_options))
    peft_model, parts, module, bounds = _build_stage(base_model, jobs, info, stage_layers, compile, cudagraphs)
    owned_ids = {id(p) for p in module.parameters()}
    named = dict(peft_model.named_parameters())
    params = {job.name: [p for n, p in named.items() if id(p) in owned_ids and f".{job.name}." in n and "lora_" in n] for job in jobs}
    # norms are all-reduced on their own (gloo, host) group: the default group carries only P2P traffic
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if info.active else None
    steps = LazySteps(jobs, params, group=group, stage=stage, keep_grads=cudagraphs)
    start_round = 0
    if resume and read_state(out) is not None:
        state = load_checkpoint(out, peft_model=peft_model, optimizers=steps.optimizers, stage=stage, device=device)
        start_round = state["next_round"]
        steps.steps_done = {name: entry["steps_done"] for name, entry in state["jobs"].items()}
    expected = {job.name: sum(name == job.name for rnd in rounds[:start_round] for name, _ in rnd.finished) for job in jobs}
    if expected != steps.steps_done:
        raise ValueError(f"checkpoint says steps {steps.steps_done} but the plan finishes {expected} before round {start_round}; the checkpoint does not match this plan")

    end_round = len(rounds) if max_rounds is None else min(len(rounds), start_round + max_rounds)
    cuts = set(range(start_round + checkpoint_every, end_round, checkpoint_every)) if checkpoint_every else set()
    cuts |= {r + 1 for r in fail_at_round.values()}  # the same on every rank: all ranks plan the same windows
    size = window_microbatches if window_microbatches is not None else (DEFAULT_WINDOW_MICROBATCHES if S > 1 else None)
    windows = plan_windows(rounds[start_round:end_round], stages=S, window_microbatches=size, first_round=start_round, cuts=cuts)
    clock = StageClock(device)
    runner = StageRunner(module, jobs, steps=steps, info=info, clock=clock, capacity=capacity, pad_multiple=pad_multiple, seed=seed,
                         hidden_size=parts.embed.embedding_dim, vocab_size=parts.lm_head.out_features, dtype=parts.embed.weight.dtype)
    log = MetricsLog(out, info.rank)
    job_index = {job.name: j for j, job in enumerate(jobs)}
    meters = {job.name: JobMeter() for job in jobs}
    step_loss: dict[Step, float] = {}
    bar = None
    if progress and info.rank == 0 and windows:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rounds), initial=start_round, desc="lorafusion pipeline", unit="round")
    for w, window in enumerate(windows):
        run = runner.run(window)
        log.window(window=w, stage=stage, microbatches=len(window.microbatches), padding=window.padding,
                   tokens=sum(run.job_tokens.values()), next_round=window.end_round, busy_s=run.busy_s, wall_s=run.wall_s)
        for items, row in zip(window.microbatches, run.losses):  # microbatch order: sums do not depend on windows
            for job, step in sorted({(job, step) for job, step, _ in items}):
                step_loss[job, step] = step_loss.get((job, step), 0.0) + row[job_index[job]]
        for name, n in run.job_tokens.items():
            meters[name].tokens += n
            meters[name].seconds += run.wall_s
        for name, step in run.applied:
            meters[name].losses.append(step_loss.pop((name, step)))
            if info.rank == 0:
                log.job_step(job=name, step=step, loss=meters[name].losses[-1], meter=meters[name])
        if window.end_round is None:
            continue
        if fail_at_round.get(info.rank) == window.end_round - 1:
            raise RuntimeError(f"injected failure on rank {info.rank} after round {window.end_round - 1}")
        if out is not None and (checkpoint_every is None or (window.end_round - start_round) % checkpoint_every == 0
                                or window.end_round == end_round):
            save_checkpoint(out, next_round=window.end_round, steps_done=steps.steps_done, peft_model=peft_model,
                            owned=lambda n: id(named[n]) in owned_ids, optimizers=steps.optimizers, stage=stage, device=device,
                            barrier=(lambda: dist.barrier()) if info.active else (lambda: None), gather=_gather(info))
        if bar is not None:
            bar.update(window.end_round - bar.n)
            bar.set_postfix({name: f"{m.losses[-1]:.3f}" for name, m in meters.items() if m.losses})
    if bar is not None:
        bar.close()
    if group is not None:
        dist.destroy_process_group(group)
    return PipelineResult(
        model=peft_model, steps_done=dict(steps.steps_done), losses={n: m.losses for n, m in meters.items()},
        tokens_per_s={n: m.tokens_per_s for n, m in meters.items()}, bubble_ratio=log.bubble_ratio,
        next_round=end_round, total_rounds=len(rounds), stage=stage, num_stages=S, stage_layers=list(bounds),
        windows=len(windows), padding_microbatches=sum(window.padding for window in windows),
    )


def _gather(info: DistInfo):
    def gather(obj):
        if not info.active:
            return [obj]
        box = [None] * info.world_size if info.rank == 0 else None
        dist.gather_object(obj, box, dst=0)
        return box
    return gather
