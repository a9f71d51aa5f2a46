"""Pipeline timeline PNG: one row per stage, forward/backward boxes colored by job."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .microbatch import Microbatch
from .simulator import SimulationResult

__all__ = ["draw_timeline"]

_LEGEND_JOBS = 20
_STYLE = {"F": {"alpha": 0.55, "hatch": "///"}, "B": {"alpha": 1.0}}
"""Forward boxes are lighter and hatched, backward boxes solid."""


def draw_timeline(
    simulation: SimulationResult,
    microbatches: Sequence[Microbatch],
    lengths: dict[str, tuple[int, ...]],
    pad_multiple: int,
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Draw the simulated timeline to a PNG at ``path`` and return the path.

    Stage 0 is the top row; the x axis is time in milliseconds. A box is split into
    horizontal stripes, one per job in the microbatch, with heights proportional to that
    job's padded tokens. Forwards are light and hatched, backwards solid; idle time stays blank.
    """
    jobs = sorted({job for mb in microbatches for job, _, _ in mb.items})
    palette = colormaps["tab10" if len(jobs) <= 10 else "tab20"]
    color = {job: palette(k % palette.N) for k, job in enumerate(jobs)}
    shares = [mb.job_padded_tokens(lengths, pad_multiple) for mb in microbatches]
    width = min(40.0, 8.0 + 0.01 * len(simulation.ops))
    # An explicit Agg canvas: no pyplot, no global backend switch, no GUI.
    fig = Figure(figsize=(width, 1.0 + 0.7 * simulation.stages))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    boxes: dict[str, list[Rectangle]] = {"F": [], "B": []}
    faces: dict[str, list[tuple[float, ...]]] = {"F": [], "B": []}
    for op in simulation.ops:
        total = sum(shares[op.microbatch].values())
        if op.end_s <= op.start_s or total == 0:
            continue
        bottom = op.stage - 0.4
        for job, tokens in sorted(shares[op.microbatch].items()):
            height = 0.8 * tokens / total
            boxes[op.kind].append(
                Rectangle((op.start_s * 1e3, bottom), (op.end_s - op.start_s) * 1e3, height)
            )
            faces[op.kind].append(color[job])
            bottom += height
    for kind, style in _STYLE.items():
        collection = PatchCollection(boxes[kind], facecolors=faces[kind], edgecolors="white", linewidths=0.3, **style)
        ax.add_collection(collection)
    ax.set_xlim(0.0, max(simulation.makespan_s * 1e3, 1e-9))
    ax.set_ylim(simulation.stages - 0.5, -0.5)
    ax.set_yticks(range(simulation.stages), [f"stage {s}" for s in range(simulation.stages)])
    ax.set_xlabel("time (ms)")
    ax.set_title(title or f"1F1B timeline, bubble ratio {simulation.bubble_ratio:.1%}")
    handles = [Patch(facecolor=color[job], label=job) for job in jobs[:_LEGEND_JOBS]]
    if len(jobs) > _LEGEND_JOBS:
        handles.append(Patch(facecolor="white", label=f"... {len(jobs) - _LEGEND_JOBS} more jobs"))
    handles += [
        Patch(facecolor="grey", edgecolor="white", label="forward", **_STYLE["F"]),
        Patch(facecolor="grey", label="backward", **_STYLE["B"]),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
