"""Several LoRA jobs on one GPU: trained together (``lorafusion.pipeline``, one stage) vs one
after another (PEFT + ``torch.compile``), steady-state tokens/s (issue 7's "4 jobs" row).

    python benchmarks/jobs.py --layers 8 --jobs 4 --samples 64 --capacity 4096 [--variants seq seq+cg together together+cg]
    python benchmarks/jobs.py --tiny --device cpu --jobs 2 --samples 8 --capacity 256 --variants seq together   # smoke test

Both sides train the same samples (the scheduler's length distributions xsum, cnn_dailymail,
wikisum in turn; random token ids), packed by the same packer into ``[1, capacity]``
microbatches with the same block-causal mask and weighted token loss, with AdamW steps per
global batch:

* together: ``lorafusion.pipeline`` (all jobs' samples mixed per microbatch, the fused
  multi-adapter op, ``backend="lorafusion"`` on CUDA); ``together+cg`` with the stage recorded
  as CUDA graphs (``cudagraphs=True``, the pipeline's default on one GPU), ``together`` without.
  Windows of ``--window`` microbatches; the first window (compilation) is left out of the rate.
* one after another (``seq``, the baseline): for each job alone, PEFT with one adapter on the
  same base, the same stage module compiled with Inductor, the job's own microbatches (the
  scheduler's plan for it alone); its first ``--warmup`` microbatches (compilation) are left
  out of its rate. ``seq+cg``: the same with ``mode="reduce-overhead"``.

Printed: tokens/s of every variant (real tokens, padding excluded) and each ÷ ``seq``
(issue 7 target: together ≥ 1.3× seq for 4 jobs on an H100).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from pipeline import TARGETS, build_base, make_jobs  # noqa: E402  (the multi-job benchmark's model and jobs)


VARIANTS = ("seq", "seq+cg", "together", "together+cg")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def together(base, jobs, args, device: torch.device, *, cudagraphs: bool) -> dict:
    """Steady tokens/s of all jobs in one ``pipeline`` call (windows after the first; base restored afterwards)."""
    from lorafusion_compiler.runtime.pipeline import pipeline

    out = tempfile.mkdtemp(prefix="lorafusion-jobs-")
    torch._dynamo.reset()
    result = pipeline(base, jobs, capacity=args.capacity, pad_multiple=args.pad_multiple, out_dir=out, device=device,
                      compile=device.type == "cuda" or args.compile_cpu, cudagraphs=cudagraphs,
                      window_microbatches=args.window, progress=False, schedule_options={"time_limit_s": args.time_limit})
    result.model.unload()  # the base model without LoRA layers, for the next variant
    with open(os.path.join(out, "metrics-rank0.jsonl")) as f:
        windows = [r for r in map(json.loads, f) if r["kind"] == "stage"]
    steady = windows[1:] or windows
    tokens = sum(r["tokens"] for r in steady)
    seconds = sum(r["wall_s"] for r in steady)
    return {"cudagraphs": cudagraphs, "windows": len(windows), "steady_windows": len(steady), "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds}


def one_after_another(base, jobs, args, device: torch.device, *, cudagraphs: bool) -> dict:
    """Each job alone in turn (``one_job``); tokens/s over all of them."""
    runs = [one_job(base, job, args, device, cudagraphs=cudagraphs) for job in jobs]
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    return {"cudagraphs": cudagraphs, "jobs": runs, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def one_job(base, job, args, device: torch.device, *, cudagraphs: bool) -> dict:
    """Steady tokens/s of ``job`` trained alone with PEFT + Inductor (base restored afterwards);
    cudagraphs: Inductor's ``mode="reduce-overhead"``, gradients kept allocated (zeroed in place)
    so that accumulation over a step's microbatches adds into them instead of adopting graph outputs."""
    from peft import LoraConfig, get_peft_model

    from lorafusion_compiler.runtime.packer import block_causal_mask, pack_microbatch, plan_schedule
    from lorafusion_compiler.runtime.stage_runner import TokenLoss
    from lorafusion_compiler.runtime.stages import StageContext, StageModule, decoder_parts

    config = LoraConfig(r=job.rank, lora_alpha=job.alpha, lora_dropout=job.dropout, target_modules=list(TARGETS))
    model = get_peft_model(base, config)
    parts = decoder_parts(model)
    stage = StageModule(parts, 0, len(parts.layers), first=True, last=True).to(device)
    torch._dynamo.reset()
    if device.type == "cuda" or args.compile_cpu:
        stage.compile_compute(backend="inductor", **({"mode": "reduce-overhead"} if cudagraphs else {}))
    params = [p for p in model.parameters() if p.requires_grad]
    if cudagraphs:
        for p in params:
            p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params, lr=job.lr)
    loss_fn = TokenLoss(1)
    plan = [mb for mb in plan_schedule([job], capacity=args.capacity, pad_multiple=args.pad_multiple, stages=1,
                                       time_limit_s=args.time_limit) if mb]
    last_of_step = {step: k for k, items in enumerate(plan) for _, step, _ in items}
    step_ends = set(last_of_step.values())  # microbatches after which an optimizer step is due
    tokens = 0
    _sync(device)
    start = time.perf_counter()
    for k, items in enumerate(plan):
        if k == args.warmup:
            _sync(device)
            start, tokens = time.perf_counter(), 0
        mb = pack_microbatch(items, [job], capacity=args.capacity, pad_multiple=args.pad_multiple).to(device)
        stage.feed([StageContext.from_microbatch(mb, device=device)])
        logits = stage(mb.input_ids)
        loss_fn(logits, (mb.labels, mb.weights, mb.token_job)).backward()
        if k in step_ends:
            optimizer.step()
            optimizer.zero_grad(set_to_none=not cudagraphs)
        tokens += sum(mb.job_tokens.values())
    _sync(device)
    seconds = time.perf_counter() - start
    model.unload()  # the base model without LoRA layers, for the next job
    return {"job": job.name, "microbatches": len(plan), "timed": max(0, len(plan) - args.warmup), "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64, help="samples per job")
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--capacity", type=int, default=4096, help="tokens per microbatch")
    parser.add_argument("--pad-multiple", type=int, default=128)
    parser.add_argument("--window", type=int, default=4, help="microbatches per pipeline window (together)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first microbatches per job (one after another)")
    parser.add_argument("--time-limit", type=float, default=2.0, help="CP-SAT seconds")
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 model (CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-cpu", action="store_true", help="also compile on a CPU (slow; off by default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["seq", "together", "together+cg"],
                        help="seq: one after another, PEFT + Inductor (the baseline, always run); seq+cg: the same with "
                             "mode='reduce-overhead'; together: lorafusion.pipeline, cudagraphs=False; together+cg: cudagraphs=True")
    args = parser.parse_args()
    device = torch.device(args.device)
    base, vocab = build_base(args.layers, args.tiny)
    base.to(device)
    jobs = make_jobs(args, vocab)
    variants = ["seq"] + [v for v in args.variants if v != "seq"]
    results = {}
    for name in variants:
        run = one_after_another if name.startswith("seq") else together
        results[name] = run(base, jobs, args, device, cudagraphs=name.endswith("+cg"))
    baseline = results["seq"]["tokens_per_s"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "layers": args.layers, "jobs": args.jobs, "capacity": args.capacity, "results": results,
        "tokens_per_s": {name: r["tokens_per_s"] for name, r in results.items()},
        "over_seq": {name: r["tokens_per_s"] / baseline for name, r in results.items()},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
