"""The ``lorafusion`` command line: ``lorafusion demo``, ``lorafusion train``, ``lorafusion schedule``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    if args.adapters > 1:
        return _multi_demo(args)
    from lorafusion_compiler.product.demo import DemoOptions, run_demo

    options = DemoOptions(steps=args.steps, batch=args.batch, seq_len=args.seq_len, rank=args.rank, dropout=args.dropout, text=args.text, compile=not args.eager, seed=args.seed)
    result = run_demo(options)
    if result.report is not None:
        print(result.report)
    curve = result.losses
    marks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})
    print("loss (nats/token): " + "  ".join(f"step {i + 1}: {curve[i]:.3f}" for i in marks))
    print(f"trained {len(curve)} steps in {result.seconds:.1f} s; loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    return 0


def _multi_demo(args: argparse.Namespace) -> int:
    from lorafusion_compiler.product.multi_demo import run_multi_demo

    result = run_multi_demo(adapters=args.adapters, steps=args.steps, batch=args.batch, seq_len=args.seq_len, dropout=args.dropout, compile=not args.eager, seed=args.seed)
    print(f"trained {args.adapters} adapters together for {args.steps} steps in {result.seconds:.1f} s (one shared frozen base):")
    for name, curve in result.losses.items():
        print(f"  {name:<8} loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from lorafusion_compiler.product.train import run_train
    from lorafusion_compiler.product.train_config import load_train_config

    config = load_train_config(args.config)
    if args.out_dir:
        config = dataclasses.replace(config, out_dir=args.out_dir)
    if args.resume:
        config = dataclasses.replace(config, resume=True)
    report = run_train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {len(report['jobs'])} job(s) in {report['seconds']:.1f} s on {report['stages']} stage(s); "
              f"peak memory {report['peak_memory_gib']:.2f} GiB; bubble ratio (stage 0) {report['bubble_ratio_this_stage']:.1%}")
        for name, job in report["jobs"].items():
            rate = f"{job['tokens_per_s']:.0f} tokens/s" if job["tokens_per_s"] else "-"
            print(f"  {name:<12} {job['steps_done']} steps  loss {job['first_loss']:.3f} -> {job['last_loss']:.3f}  {rate}")
        print(f"adapters (PEFT format), metrics, report.json and {Path(report['timeline_png']).name} in {config.out_dir}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafusion", description="Fast LoRA fine-tuning with torch.compile")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune a LoRA adapter on the embedded tiny LLaMa (CPU is fine)")
    demo.add_argument("--steps", type=int, default=120, help="optimizer steps (default 120)")
    demo.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    demo.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    demo.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    demo.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    demo.add_argument("--text", default="tales", help="shipped text: tales, recipes, code or facts")
    demo.add_argument("--eager", action="store_true", help="run eager PEFT instead of the lorafusion backend")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--adapters", type=int, default=1, help="adapters trained together, one per shipped text (1-4, default 1)")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train the LoRA jobs of a YAML/JSON config together (CPU, GPU or torchrun)")
    train.add_argument("config", help="config file; example: lorafusion_compiler/product/examples/train.yaml")
    train.add_argument("--out-dir", default=None, help="override the config's out_dir")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    train.set_defaults(func=_train)
    try:
        from lorafusion_compiler.scheduler.cli import add_schedule_subcommand
    except ImportError:
        pass
    else:
        add_schedule_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorafusion`` command."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"lorafusion: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
