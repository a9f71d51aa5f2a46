"""GPU time per kernel family of profiled steps, side by side (the Chrome traces ``e2e.py --profile-dir`` writes).

For each trace: the sum (ms) and count of the kernels, copies and memsets of each family (the
fused LoRA GEMMs, the three split kernels, cuBLAS GEMMs, attention, Inductor's kernels, ...),
then every kernel together, the span from the first to the last, and the idle gaps between them.
Comparing a floor, a p=0 and a p=0.1 step this way shows where a step's time goes; a family that
grows in a step whose work did not change points at clocks, not code.

    python benchmarks/trace_summary.py DIR/profile-floor_cg-pNone.trace.json DIR/profile-ours_cg-p0.0.trace.json
    python benchmarks/trace_summary.py --top 15 DIR/*.trace.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FAMILIES", "GPU_CATEGORIES", "Summary", "family_of", "gpu_events", "summarize"]

FAMILIES: tuple[tuple[str, str], ...] = (
    ("fused GEMMs (base_expand, dX)", r"lora_gemm|lowrank_gemm|base_expand_kernel|dx_kernel"),
    ("shrink", r"shrink_kernel"),
    ("ds_db", r"ds_db_kernel"),
    ("dA", r"da_kernel"),
    ("shrink + dA (Gluon)", r"_split_kernel"),
    ("cuBLAS GEMMs", r"nvjet|cutlass|gemm|sm90_xmma"),
    ("attention", r"sdpa|flash|fmha|cudnn"),
    ("Inductor (triton_*)", r"^triton_"),
    ("random numbers", r"distribution|philox|curand"),
    ("ATen elementwise / reductions", r"at::native::"),
    ("copies", r"^Memcpy"),
    ("memsets", r"^Memset"),
)
"""(family, regular expression searched in the kernel name), first match wins; the rest is "other"."""

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
"""Trace event categories that run on the GPU."""


def family_of(name: str) -> str:
    """The first family of ``FAMILIES`` whose pattern occurs in the kernel ``name``, else "other"."""
    return next((family for family, pattern in FAMILIES if re.search(pattern, name)), "other")


def gpu_events(trace: dict) -> list[dict]:
    """The complete ("X") GPU events of a Chrome trace (``torch.profiler`` export), by start time."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    return sorted(events, key=lambda e: e["ts"])


@dataclass
class Summary:
    """GPU time of one trace (µs): per family, in total, and between the events."""

    family_us: Counter = field(default_factory=Counter)
    family_count: Counter = field(default_factory=Counter)
    kernel_us: Counter = field(default_factory=Counter)
    busy_us: float = 0.0
    """Sum of the events' durations (overlapping events count twice)."""
    span_us: float = 0.0
    """First start to last end."""
    idle_us: float = 0.0
    """Time in the span when no event runs."""


def summarize(events: list[dict]) -> Summary:
    """Sum ``events`` (``gpu_events``) by family and by kernel name, and measure the idle time between them."""
    out = Summary()
    end = None
    for e in events:
        name, start, dur = e["name"], float(e["ts"]), float(e.get("dur", 0.0))
        family = family_of(name)
        out.family_us[family] += dur
        out.family_count[family] += 1
        out.kernel_us[name] += dur
        out.busy_us += dur
        if end is not None and start > end:
            out.idle_us += start - end
        end = start + dur if end is None else max(end, start + dur)
    if events:
        out.span_us = end - float(events[0]["ts"])
    return out


def _table(names: list[str], summaries: list[Summary], top: int) -> str:
    width = max(12, *(len(n) for n in names))
    lines = [f"{'family (ms, count)':<32}" + "".join(f"{n:>{width + 2}}" for n in names)]
    families = [f for f, _ in FAMILIES] + ["other"]
    for family in families:
        if not any(s.family_count[family] for s in summaries):
            continue
        cells = "".join(f"{f'{s.family_us[family] / 1e3:.2f} ({s.family_count[family]})':>{width + 2}}" for s in summaries)
        lines.append(f"{family:<32}{cells}")
    for label, attr in (("all GPU events", "busy_us"), ("span", "span_us"), ("idle in the span", "idle_us")):
        lines.append(f"{label:<32}" + "".join(f"{getattr(s, attr) / 1e3:>{width + 2}.2f}" for s in summaries))
    if top:
        for name, s in zip(names, summaries):
            lines.append(f"\n{name}: the {top} longest kernels (ms, total over the step)")
            lines += [f"  {us / 1e3:8.3f}  {kernel[:100]}" for kernel, us in s.kernel_us.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", type=Path, help="Chrome trace JSON files (torch.profiler export)")
    parser.add_argument("--top", type=int, default=0, help="also list each trace's N longest kernels")
    args = parser.parse_args(argv)
    summaries = []
    for path in args.traces:
        if not path.is_file():
            parser.error(f"trace {str(path)!r} is not a file")
        summaries.append(summarize(gpu_events(json.loads(path.read_text()))))
    names = [p.name.removeprefix("profile-").removesuffix(".trace.json") for p in args.traces]
    table = _table(names, summaries, args.top)
    print(table)
    return table


if __name__ == "__main__":
    main()
