"""Layer benchmark: frozen base linear vs eager LoRA vs Inductor LoRA vs lorafusion (Triton kernels).

One process, CUDA-event medians, fresh random inputs rotated over several sets; the four
variants of a row are timed round-robin (one call each per round, ``timing.py``), so that the
GPU's clock drift falls on all of them alike. The CUDA-graph replays are timed twice: as soon as
the graphs are captured ("graphed") and after a burn-in of back-to-back GEMMs ("sustained", the
power-capped clocks a training step runs at; ``timing.burn_in``). "time" is
forward+backward of one layer (``y = layer(x); y.backward(dy)``, x requiring grad); "base"
is the frozen ``F.linear(x, W)`` forward+backward (dX only). Everything bf16 (x, W, A, B).

    python benchmarks/layer.py                 # the full table of BENCHMARKS.md
    python benchmarks/layer.py --quick         # first shape only
    python benchmarks/layer.py --quick --profile-dir /tmp/lp && python benchmarks/trace_summary.py --top 20 /tmp/lp/*.trace.json
                                               # every kernel of each variant's graphed layer
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cuda_graph import capture
from profiling import profile_call
from timing import burn_in, interleaved_ms

from lorafusion_compiler.ops.lora_linear import lora_linear

__all__ = ["SHAPES", "fwd_bwd_call", "graph_of", "main", "make_layers", "saved_bytes"]

SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (8192, 5120, 5120), (8192, 8192, 8192), (2048, 4096, 4096)]
"""(M, K, N) of the issue; the first five are the M=8192 geometric-mean set."""


def eager_lora(x, w, a, b, scale: float, p: float):
    """PEFT-style LoRA linear (bias-free base)."""
    return F.linear(x, w) + F.linear(F.linear(F.dropout(x, p), a), b) * scale


def make_layers(scale: float, p: float) -> dict[str, Callable]:
    """name -> fn(x, w, a, b) for the four variants, and on Hopper a fifth and sixth, "gluon" and "gluon-gemms":
    ours with those kernel sets (shrink, dA, dS/dB in Gluon, the second also the fused GEMMs; the first is what
    ``kernels="auto"`` runs with CUDA graphs on Hopper). "ours" is the "triton" set."""
    compiled = torch.compile(eager_lora, dynamic=False)
    layers = {
        "base": lambda x, w, a, b: F.linear(x, w),
        "eager": lambda x, w, a, b: eager_lora(x, w, a, b, scale, p),
        "inductor": lambda x, w, a, b: compiled(x, w, a, b, scale, p),
        "ours": lambda x, w, a, b: lora_linear(x, w, None, a, b, scale, p, x.dtype, "triton", False)[0],
    }
    if torch.cuda.get_device_capability()[0] == 9:
        for name in ("gluon", "gluon-gemms"):
            layers[name] = (lambda x, w, a, b, name=name:
                            lora_linear(x, w, None, a, b, scale, p, x.dtype, name, False)[0])
    return layers


_SHORT = {"eager": "eag", "inductor": "ind", "ours": "our", "gluon": "glu", "gluon-gemms": "ggm"}
"""Column labels of the printed rows."""


def _compared(row: dict) -> list[str]:
    """The LoRA variants a row holds, in table order."""
    return [name for name in ("eager", "inductor", "ours", "gluon", "gluon-gemms") if name in row]


def _inputs(m: int, k: int, n: int, r: int, sets: int, dtype=torch.bfloat16):
    dev = "cuda"
    w = torch.randn(n, k, device=dev, dtype=dtype) / math.sqrt(k)
    a = (torch.randn(r, k, device=dev, dtype=dtype) / math.sqrt(k)).requires_grad_()
    b = (torch.randn(n, r, device=dev, dtype=dtype) * 0.01).requires_grad_()
    data = [(torch.randn(m, k, device=dev, dtype=dtype).requires_grad_(), torch.randn(m, n, device=dev, dtype=dtype))
            for _ in range(sets)]
    return w, a, b, data


def fwd_bwd_call(fn: Callable, w, a, b, data, *, backward: bool = True) -> Callable[[], None]:
    """One forward (+ backward with dy) of fn per call, on the next input set each call."""
    sets = itertools.count()

    def call() -> None:
        x, dy = data[next(sets) % len(data)]
        for t in (x, a, b):
            t.grad = None
        if backward:
            fn(x, w, a, b).backward(dy)
        else:
            with torch.no_grad():
                fn(x, w, a, b)
    return call


def graph_of(fn: Callable, w, a, b, data) -> torch.cuda.CUDAGraph:
    """fn forward+backward captured in a CUDA graph (replays have no host launch overhead)."""
    x, dy = data[0]
    graph, _ = capture(lambda: fn(x, w, a, b).backward(dy), clear=(x, a, b))
    return graph


def saved_bytes(fn: Callable, w, a, b, data) -> int:
    """Device bytes still held after the forward beyond the output: what is saved for backward, minus x."""
    x, _ = data[0]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = fn(x, w, a, b)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    del y
    return held


def run(shapes, ranks, ps, *, alpha: float = 32.0, fwd_only: bool = True, memory: bool = False,
        sustained: bool = True, profile_dir: str | None = None, log=print):
    """Benchmark rows: dicts with shape, r, p and per-variant ms (fwd+bwd, fwd-only, graphed and,
    with ``sustained``, graphed after a 1 s burn-in: keys ``<variant>_sus``). With ``profile_dir``,
    one profiled replay of each variant's graph per row is written there (``profiling.profile_call``:
    ``profile-layer-<M>x<K>x<N>-r<r>-p<p>-<variant>.trace.json``, read by ``trace_summary.py``)."""
    rows = []
    for (m, k, n) in shapes:
        for r in ranks:
            for p in ps:
                torch.manual_seed(0)
                w, a, b, data = _inputs(m, k, n, r, sets=3 if m * max(k, n) <= 8192 * 8192 else 2)
                layers = make_layers(alpha / r, p)
                row = {"shape": (m, k, n), "r": r, "p": p}
                # every timing below calls the four variants round-robin (benchmarks/timing.py)
                timed = interleaved_ms({name: fwd_bwd_call(fn, w, a, b, data) for name, fn in layers.items()}, rounds=20)
                row.update(timed)
                if fwd_only:
                    timed = interleaved_ms({name: fwd_bwd_call(fn, w, a, b, data, backward=False)
                                            for name, fn in layers.items()}, rounds=20)
                    row.update({name + "_fwd": t for name, t in timed.items()})
                if memory:
                    row.update({name + "_mem": saved_bytes(fn, w, a, b, data) for name, fn in layers.items() if name != "base"})
                graphs = {name: graph_of(fn, w, a, b, data) for name, fn in layers.items()}
                timed = interleaved_ms({name: g.replay for name, g in graphs.items()}, rounds=20)
                row.update({name + "_graph": t for name, t in timed.items()})
                if sustained:
                    burn_in(seconds=1.0)
                    timed = interleaved_ms({name: g.replay for name, g in graphs.items()}, rounds=30, warmup=0)
                    row.update({name + "_sus": t for name, t in timed.items()})
                if profile_dir:
                    os.makedirs(profile_dir, exist_ok=True)
                    for name, g in graphs.items():
                        profile_call(g.replay, os.path.join(profile_dir, f"profile-layer-{m}x{k}x{n}-r{r}-p{p}-{name}.txt"),
                                     hot_calls=5)
                del graphs
                log(_fmt(row))
                rows.append(row)
                del w, a, b, data
                torch.cuda.empty_cache()
    return rows


def _fmt(row) -> str:
    m, k, n = row["shape"]
    base = row["base"]
    s = f"{m:5d} {k:5d} {n:5d} r={row['r']:3d} p={row['p']:.1f} | base {base:7.3f} ms"
    for name in _compared(row):
        s += f" | {name} {row[name] / base:5.2f}"
    if "ours_graph" in row:
        s += " || graphed/base: " + " ".join(
            f"{_SHORT[nm]} {row[nm + '_graph'] / row['base_graph']:4.2f}" for nm in _compared(row))
    if "ours_sus" in row:
        s += f" || sustained/base ({row['base_sus']:.3f} ms): " + " ".join(
            f"{_SHORT[nm]} {row[nm + '_sus'] / row['base_sus']:4.2f}" for nm in _compared(row))
    if "ours_fwd" in row:
        s += " || fwd/base: " + " ".join(f"{_SHORT[nm]} {row[nm + '_fwd'] / row['base_fwd']:4.2f}" for nm in _compared(row))
    if "ours_mem" in row:
        s += " || saved MiB: " + " ".join(f"{_SHORT[nm]} {row[nm + '_mem'] / 2**20:7.1f}" for nm in _compared(row))
    return s


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(rows) -> str:
    """Geometric means of ratio/base over the M=8192 shapes at r=16, per p and variant."""
    out = []
    for p in sorted({r_["p"] for r_ in rows}):
        sel = [r_ for r_ in rows if r_["r"] == 16 and r_["p"] == p and r_["shape"][0] == 8192]
        if sel:
            out.append(f"geomean M=8192 r=16 p={p}: " + " ".join(
                f"{nm} {geomean(r_[nm] / r_['base'] for r_ in sel):.3f}" for nm in _compared(sel[0]))
                + " | graphed: " + " ".join(
                    f"{nm} {geomean(r_[nm + '_graph'] / r_['base_graph'] for r_ in sel):.3f}"
                    for nm in _compared(sel[0]))
                + ("" if "ours_sus" not in sel[0] else " | sustained: " + " ".join(
                    f"{nm} {geomean(r_[nm + '_sus'] / r_['base_sus'] for r_ in sel):.3f}"
                    for nm in _compared(sel[0]))))
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first shape only, r=16")
    parser.add_argument("--ranks", action="store_true", help="also r in {8, 64, 128} on the first shape, with memory")
    parser.add_argument("--profile-dir", default=None,
                        help="write one profiled graph replay (op table, Chrome trace) per variant and row here: every "
                             "kernel of the layer with its GPU time (python trace_summary.py --top 20 DIR/*.trace.json)")
    args = parser.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = run(shapes, [16], [0.0, 0.1], memory=True, profile_dir=args.profile_dir)
    if args.ranks:
        rows += run(SHAPES[:1], [8, 64, 128], [0.0, 0.1], memory=True, profile_dir=args.profile_dir)
    print(summary(rows))


if __name__ == "__main__":
    main()
