"""The ``lorafusion schedule`` subcommand: plan a jobs file, print the summary, draw the PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .jobfile import load_jobs_file
from .plan import schedule
from .simulator import StageCosts
from .verify import ScheduleError

__all__ = ["add_schedule_subcommand", "run_schedule"]


def add_schedule_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``schedule`` on an argparse subparsers object; its ``func`` is ``run_schedule``."""
    parser = subparsers.add_parser(
        "schedule",
        help="plan multi-adapter microbatches for a jobs file",
        description="Plan the microbatches of several LoRA jobs (YAML/JSON jobs file), verify the "
        "plan, simulate it on a 1F1B pipeline and draw the timeline as a PNG.",
    )
    parser.add_argument("jobs_file", type=Path, help="YAML or JSON jobs file")
    parser.add_argument("--capacity", type=int, help="tokens per microbatch (default: file, else 8192)")
    parser.add_argument("--pad-multiple", type=int, help="padding multiple in tokens (default: file, else 128)")
    parser.add_argument("--stages", type=int, help="pipeline stages (default: file, else 4)")
    parser.add_argument("--time-limit", type=float, dest="time_limit_s", help="CP-SAT budget, seconds")
    parser.add_argument("--seed", type=int, help="CP-SAT random seed")
    parser.add_argument("--solver", choices=("cpsat", "greedy"), default="cpsat", help="packing solver")
    parser.add_argument(
        "--forward-cost", type=float, default=1.0e-6, help="forward seconds per padded token per stage"
    )
    parser.add_argument(
        "--backward-ratio", type=float, default=2.0, help="backward cost as a multiple of forward"
    )
    parser.add_argument("--png", type=Path, help="timeline PNG path (default: <jobs file stem>.timeline.png)")
    parser.add_argument("--json", type=Path, help="also write the plan (microbatches + stats) as JSON")
    parser.set_defaults(func=run_schedule)
    return parser


def run_schedule(args: argparse.Namespace) -> int:
    """Handle ``lorafusion schedule``; returns the process exit code (0 ok, 2 bad input)."""
    try:
        loaded = load_jobs_file(
            args.jobs_file,
            capacity=args.capacity,
            pad_multiple=args.pad_multiple,
            stages=args.stages,
            time_limit_s=args.time_limit_s,
            seed=args.seed,
        )
        costs = StageCosts(
            forward_s_per_token=args.forward_cost,
            backward_s_per_token=args.forward_cost * args.backward_ratio,
        )
        plan = schedule(loaded.jobs, solver=args.solver, costs=costs, **loaded.settings)
    except (OSError, ScheduleError, ValueError) as exc:
        print(f"lorafusion schedule: error: {exc}", file=sys.stderr)
        return 2
    print(plan.summary())
    png = args.png or Path(f"{args.jobs_file.stem}.timeline.png")
    print(f"timeline: {plan.write_timeline(png)}")
    if args.json:
        print(f"plan: {plan.write_json(args.json)}")
    return 0
