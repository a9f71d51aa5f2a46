"""Scheduler benchmarks: simulated 1F1B bubble ratio (4 mixed jobs vs each job alone) and
planning time of a 100-job / 10,000-sample instance.

    python benchmarks/schedule.py [--png-dir DIR] [--repeats N]

Published reference (LoRAFusion): bubble ratio 44.17% with one adapter vs 11.09% with
four adapters on a 4-stage pipeline. Our figures come from the simulator, not hardware.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lorafusion_compiler.scheduler import Job, sample_lengths, schedule, synthetic_jobs

CAPACITY = 8192
PAD = 128
STAGES = 4
MIXED_JOBS = (("xsum", "xsum"), ("cnn_dailymail", "cnn_dailymail"), ("wikisum", "wikisum"), ("mix", "mix"))
SAMPLES_PER_JOB = 512
GLOBAL_BATCH = 32


def bubble_comparison(png_dir: Path) -> None:
    """Plan the 4 mixed jobs together and each alone; print bubble ratios, write PNGs."""
    jobs = [
        Job(name=name, lengths=sample_lengths(dist, SAMPLES_PER_JOB, seed=k, max_tokens=CAPACITY),
            global_batch_size=GLOBAL_BATCH)
        for k, (name, dist) in enumerate(MIXED_JOBS)
    ]
    settings = dict(capacity=CAPACITY, pad_multiple=PAD, stages=STAGES, seed=0)
    print(f"== bubble ratio, S={STAGES}, C={CAPACITY}, pad={PAD}, {SAMPLES_PER_JOB} samples/job, G={GLOBAL_BATCH}")
    together = schedule(jobs, **settings)
    together.write_timeline(png_dir / "four_jobs.png")
    print(f"4 jobs together: bubble {together.stats.bubble_ratio:6.2%}  bins {together.stats.bins} "
          f"(lower bound {together.stats.lower_bound}), no-ops {together.stats.noops}, "
          f"groups {together.stats.groups}, makespan {together.stats.makespan_s:.3f} s")
    alone_ratios = []
    alone_makespan = 0.0
    for job in jobs:
        alone = schedule([job], **settings)
        alone.write_timeline(png_dir / f"alone_{job.name}.png")
        alone_ratios.append(alone.stats.bubble_ratio)
        alone_makespan += alone.stats.makespan_s
        print(f"{job.name:>15} alone: bubble {alone.stats.bubble_ratio:6.2%}  bins {alone.stats.bins}, "
              f"no-ops {alone.stats.noops}, {alone.stats.bins / job.num_steps:.2f} microbatches/step")
    print(f"one job alone, mean over the 4: bubble {statistics.mean(alone_ratios):6.2%}; "
          f"sequential makespan {alone_makespan:.3f} s vs fused {together.stats.makespan_s:.3f} s "
          f"({alone_makespan / together.stats.makespan_s:.2f}x)")
    print("published: 44.17% (one adapter) vs 11.09% (four adapters)")


def hundred_jobs(repeats: int) -> None:
    """Time the 100-job / 10k-sample plan; print bins vs the lower bound."""
    jobs = synthetic_jobs(100, 100, global_batch_size=16, seed=0, max_tokens=CAPACITY)
    print(f"== 100 jobs x 100 samples (xsum/cnn_dailymail/wikisum cycled), G=16, C={CAPACITY}, "
          f"pad={PAD}, S={STAGES}, default time_limit_s")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan = schedule(jobs, capacity=CAPACITY, pad_multiple=PAD, stages=STAGES, seed=0)
        times.append(time.perf_counter() - start)
    s = plan.stats
    print(f"plan time: first {times[0]:.3f} s, median {statistics.median(times):.3f} s over {repeats} runs "
          f"(packing {s.solve_time_s:.3f} s, {s.solver_calls} CP-SAT calls, status {s.solver_status})")
    print(f"bins {s.bins} vs lower bound {s.lower_bound} (target <= {s.lower_bound + 1}), no-ops {s.noops}, "
          f"fill {s.fill:.2%}, bubble {s.bubble_ratio:.2%}, {len(s.groups)} groups, {s.subproblems} subproblems")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--png-dir", type=Path, default=None, help="where to write the timeline PNGs (default: a temp dir)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the 100-job plan")
    args = parser.parse_args()
    png_dir = args.png_dir or Path(tempfile.mkdtemp(prefix="lorafusion-schedule-"))
    png_dir.mkdir(parents=True, exist_ok=True)
    hundred_jobs(args.repeats)
    bubble_comparison(png_dir)
    print(f"timelines written to {png_dir}")


if __name__ == "__main__":
    main()
