"""The ``lorafusion`` command line: ``lorafusion demo``, ``lorafusion schedule``."""

from __future__ import annotations

import argparse
import sys

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
