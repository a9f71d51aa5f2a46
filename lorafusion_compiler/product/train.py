"""``lorafusion train CONFIG``: train the config's jobs together and write a report.

Runs on CPU, one GPU, or ``torchrun --nproc-per-node S`` (one pipeline stage per rank).
Output in ``out_dir``: PEFT adapters per job (``<job>/step-<n>/``, see ``runtime.checkpoint``),
``metrics.jsonl``, ``report.json`` and ``timeline.png`` (the simulated schedule of the plan).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

from ..runtime import PipelineJob, pipeline
from .text_data import byte_tokens, load_text
from .tiny_llama import TinyLlamaConfig, build_tiny_llama
from .train_config import DataConfig, TrainConfig

__all__ = ["load_samples", "build_model", "run_train"]


def load_samples(data: DataConfig, *, tokenizer=None) -> list[torch.Tensor]:
    """1-D int64 token tensors of one job (byte tokens unless a tokenizer is given)."""
    encode = (lambda s: torch.tensor(tokenizer(s)["input_ids"], dtype=torch.int64)) if tokenizer else byte_tokens
    if data.text is not None:
        tokens = byte_tokens(load_text(data.text))
        samples = [tokens[i : i + data.seq_len] for i in range(0, tokens.numel(), data.seq_len)]
    elif data.jsonl is not None:
        with open(data.jsonl, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        missing = [i for i, r in enumerate(rows) if data.field not in r]
        if missing:
            raise ValueError(f"{data.jsonl}: line(s) {missing[:5]} have no field {data.field!r}")
        samples = [encode(r[data.field])[: data.seq_len] for r in rows]
    else:
        samples = [t.to(torch.int64)[: data.seq_len] for t in torch.load(data.tokens)]
    return [s for s in samples if s.numel() >= 2]


def build_model(config: TrainConfig):
    """The frozen base causal LM and its tokenizer (None for byte tokens)."""
    dtype = getattr(torch, config.dtype)
    if config.model == "tiny" or "config" in config.model:
        shape = TinyLlamaConfig(**(config.model.get("config") or {})) if isinstance(config.model, dict) else TinyLlamaConfig()
        return build_tiny_llama(shape, seed=config.seed, dtype=dtype), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = config.model["path"]
    if not Path(path).is_dir():
        raise ValueError(f"model path {path!r} is not a directory with a Hugging Face model")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    model.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB


def run_train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train every job of ``config``; returns (and writes, on rank 0) the report."""
    model, tokenizer = build_model(config)
    jobs = [
        PipelineJob(
            name=j.name, samples=load_samples(j.data, tokenizer=tokenizer), global_batch_size=j.global_batch_size,
            rank=j.rank, alpha=j.alpha, dropout=j.dropout, lr=j.lr, steps=j.steps, epochs=j.epochs,
            max_grad_norm=j.max_grad_norm, init_seed=config.seed,
        )
        for j in config.jobs
    ]
    start = time.perf_counter()
    result = pipeline(
        model, jobs, capacity=config.capacity, pad_multiple=config.pad_multiple, out_dir=config.out_dir,
        resume=config.resume, compile=config.compile, seed=config.seed, progress=progress, **config.extra,
    )
    seconds = time.perf_counter() - start
    device = next(result.model.parameters()).device
    report = {
        "seconds": seconds,
        "stages": result.num_stages,
        "bubble_ratio_this_stage": result.bubble_ratio,
        "peak_memory_gib": _peak_memory_gib(device),
        "jobs": {
            name: {
                "steps_done": result.steps_done[name],
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "tokens_per_s": result.tokens_per_s.get(name),
            }
            for name, losses in result.losses.items()
        },
    }
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["timeline_png"] = str(_timeline(jobs, config, result.num_stages, out / "timeline.png"))
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _timeline(jobs: list[PipelineJob], config: TrainConfig, stages: int, path: Path) -> Path:
    """Draw the plan's simulated 1F1B timeline (the scheduler's view of this run)."""
    from ..runtime.packer import scheduler_jobs
    from ..scheduler import schedule

    plan = schedule(scheduler_jobs(jobs), capacity=config.capacity, pad_multiple=config.pad_multiple, stages=stages, seed=config.seed)
    return plan.write_timeline(path)
