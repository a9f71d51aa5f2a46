"""Multi-job pipeline benchmark: many LoRA jobs on one LLaMa-3.1-8B-shaped base, S stages.

    torchrun --nproc-per-node 4 benchmarks/pipeline.py --layers 32 --jobs 4 --capacity 8192
    torchrun --nproc-per-node 4 benchmarks/pipeline.py --jobs 1      # one adapter, for the bubble ratio
    torchrun --nproc-per-node 4 benchmarks/pipeline.py --round-sync  # one fill/drain per round (old runtime)
    python benchmarks/pipeline.py --predict --stages 4 --jobs 4      # plan-level bubble, no training

Every rank builds the (random, bf16) base on the CPU, keeps its stage's layers on its GPU
(NCCL, one rank per GPU) and trains with ``lorafusion.pipeline``: the scheduler's plan, 1F1B
over windows of up to ``--window`` microbatches with lazy per-job optimizer steps (or one
window per round with ``--round-sync``), stage modules compiled with backend="lorafusion"
(``--no-compile`` for eager). Jobs get synthetic samples whose lengths follow the
scheduler's length distributions (``xsum``, ``cnn_dailymail``, ``wikisum``), random token ids.

Rank 0 prints one JSON object: wall time, tokens/s per job and in total, bubble ratio per
stage (1 - compute / wall, measured with CUDA syncs around every stage compute; padding
microbatches count as idle), windows and padding microbatches run. ``--predict`` prints
the plan-level bubble instead: the scheduler's simulator run on every window with one cost
per microbatch (all have the shape [1, C]; forward 1, backward 2 units; padding costs the
same) for the round-synchronous and the windowed runtime. Not run in CI (needs GPUs); CPU
smoke test: ``torchrun --nproc-per-node 2 benchmarks/pipeline.py --tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_base(layers: int, tiny: bool, bf16_tiny: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, attn_implementation="sdpa")
        dtype = torch.bfloat16 if bf16_tiny else torch.float32
    else:
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                             attn_implementation="sdpa")  # SDPA with the 4-D block-causal mask (no C x C x heads weights)
        dtype = torch.bfloat16
    torch.manual_seed(0)  # same base on every rank
    model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    return model, config.vocab_size


def make_jobs(args, vocab: int):
    from lorafusion_compiler.runtime.jobs import PipelineJob
    from lorafusion_compiler.scheduler import sample_lengths

    dists = ("xsum", "cnn_dailymail", "wikisum")
    jobs = []
    for k in range(args.jobs):
        lengths = sample_lengths(dists[k % len(dists)], args.samples, seed=k, max_tokens=args.capacity, min_tokens=16)
        g = torch.Generator().manual_seed(100 + k)
        samples = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
        jobs.append(PipelineJob(name=f"job{k}", samples=samples, global_batch_size=args.global_batch_size, rank=args.rank,
                                alpha=2 * args.rank, dropout=args.dropout, lr=1e-4, target_modules=TARGETS, init_seed=k))
    return jobs


def predict(args) -> dict:
    """Plan-level bubble of the round-synchronous and the windowed runtime (see module docstring)."""
    from lorafusion_compiler.runtime.packer import plan_schedule
    from lorafusion_compiler.runtime.pipeline import DEFAULT_WINDOW_MICROBATCHES
    from lorafusion_compiler.runtime.windows import plan_rounds, plan_windows
    from lorafusion_compiler.scheduler import Microbatch, StageCosts, simulate

    S = args.stages
    jobs = make_jobs(args, vocab=256)
    rounds = plan_rounds(plan_schedule(jobs, capacity=args.capacity, pad_multiple=args.pad_multiple, stages=S,
                                       time_limit_s=args.time_limit))

    def bubble(windows) -> dict:
        busy = idle = padding = 0.0
        for w in windows:  # each window fills and drains on its own
            sim = simulate([Microbatch(items=list(mb), padded_tokens=1) for mb in w.microbatches], stages=S,
                           costs=StageCosts(forward_s_per_token=1.0))  # F = 1, B = 2 units per microbatch
            busy, idle = busy + sum(sim.busy_s), idle + sum(sim.idle_s)
            padding += 3.0 * S * w.padding  # padding microbatches compute (F + B) on every stage
        return {"windows": len(windows), "microbatches": sum(len(w.microbatches) for w in windows),
                "padding_microbatches": sum(w.padding for w in windows),
                "bubble_ratio": (idle + padding) / (busy + idle),  # the runtime's metric: padding is idle
                "idle_slots_only": idle / (busy + idle)}

    window = args.window or DEFAULT_WINDOW_MICROBATCHES
    return {"stages": S, "jobs": args.jobs, "capacity": args.capacity, "rounds": len(rounds),
            "round_synchronous": bubble(plan_windows(rounds, stages=S, window_microbatches=None)),
            "windowed": {"window_microbatches": window, **bubble(plan_windows(rounds, stages=S, window_microbatches=window))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64, help="samples per job")
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--capacity", type=int, default=8192, help="tokens per microbatch")
    parser.add_argument("--pad-multiple", type=int, default=128)
    parser.add_argument("--max-rounds", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=2.0, help="CP-SAT seconds")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 model (CPU smoke test)")
    parser.add_argument("--tiny-bf16", action="store_true", help="with --tiny: bf16 base")
    parser.add_argument("--device", default=None, help="cpu to force gloo on CPU")
    parser.add_argument("--window", type=int, default=None, help="window_microbatches (default: the runtime's)")
    parser.add_argument("--round-sync", action="store_true", help="one window per round (checkpoint_every=1)")
    parser.add_argument("--predict", action="store_true", help="print the plan-level bubble prediction and exit")
    parser.add_argument("--stages", type=int, default=4, help="with --predict: pipeline stages")
    parser.add_argument("--out", default=None, help="checkpoint/metrics folder (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the result here (rank 0)")
    args = parser.parse_args()
    if args.predict:
        print(json.dumps(predict(args), indent=1))
        return

    from lorafusion_compiler.runtime.distributed import init_distributed
    from lorafusion_compiler.runtime.pipeline import pipeline

    backend = "gloo" if args.device == "cpu" else None
    info = init_distributed(backend=backend, device=args.device, timeout_s=1800)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, info.world_size)))
    base, vocab = build_base(args.layers, args.tiny, args.tiny_bf16)
    jobs = make_jobs(args, vocab)
    out = [args.out or (tempfile.mkdtemp(prefix="lorafusion-pipeline-") if info.rank == 0 else None)]
    if info.active:  # one shared folder for all ranks
        dist.broadcast_object_list(out, src=0)
    out = out[0]
    start = time.perf_counter()
    result = pipeline(base, jobs, capacity=args.capacity, pad_multiple=args.pad_multiple, out_dir=out,
                      max_rounds=args.max_rounds, compile=not args.no_compile and info.device.type == "cuda",
                      schedule_options={"time_limit_s": args.time_limit}, device=info.device, timeout_s=1800,
                      checkpoint_every=1 if args.round_sync else 10**9, window_microbatches=args.window)
    wall = time.perf_counter() - start
    bubbles = [None] * info.world_size if info.active else [result.bubble_ratio]
    if info.active:
        dist.all_gather_object(bubbles, result.bubble_ratio)
    if info.rank == 0:
        tokens = sum(sum(job.lengths) for job in jobs)
        report = {
            "stages": info.world_size, "jobs": args.jobs, "layers": args.layers, "capacity": args.capacity,
            "rounds": result.next_round, "total_rounds": result.total_rounds, "wall_s": wall,
            "windows": result.windows, "padding_microbatches": result.padding_microbatches, "round_sync": args.round_sync,
            "stage_layers": result.stage_layers, "bubble_ratio_per_stage": bubbles,
            "bubble_ratio_mean": sum(bubbles) / len(bubbles), "tokens_per_s_per_job": result.tokens_per_s,
            "tokens_per_s_total": tokens / wall if result.finished else None,
            "steps_done": result.steps_done, "device": str(info.device), "out_dir": out,
        }
        print(json.dumps(report, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    if info.active:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
