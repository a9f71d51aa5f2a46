"""What the backend did to a model: matched LoRA sites and linears left alone.

The backend appends one entry per compiled graph to every active collector
(``collect_reports``); ``lorafusion.explain`` uses that to build an :class:`ExplainReport`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .passes.lora_pattern import LoRASite, SkippedLinear

__all__ = ["ExplainReport", "collect_reports", "publish"]

_COLLECTORS: list["ExplainReport"] = []


@dataclass
class ExplainReport:
    """Sites the ``lorafusion`` backend matched (``matched``) and linears it left alone (``skipped``).

    ``str(report)`` is a readable table.
    """

    matched: list[LoRASite] = field(default_factory=list)
    skipped: list[SkippedLinear] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    """Kernel set used for each matched site (``"triton"``, ``"gluon"``, ``"gluon-gemms"`` or ``"torch"``)."""
    shared: list[list[str]] = field(default_factory=list)
    """Module paths of each group of sites rewritten into one shared-input op (``share_inputs``)."""
    graphs: int = 0
    """Number of FX graphs the backend compiled (more than one means graph breaks)."""

    def __str__(self) -> str:
        lines = [f"lorafusion: {len(self.matched)} LoRA site(s) matched, {len(self.skipped)} linear(s) left alone, {self.graphs} graph(s)"]
        if self.matched:
            header = ("module", "rank", "K->N", "x shape", "dtype/adapter", "scale", "p", "bias", "base", "kernels")
            rows = [header]
            for site, kernels in zip(self.matched, self.kernels):
                rows.append(
                    (
                        site.module_path or "<root>",
                        str(site.rank),
                        f"{site.in_features}->{site.out_features}",
                        "x".join(map(str, site.x_shape)),
                        f"{_short(site.dtype)}/{_short(site.adapter_dtype)}",
                        f"{site.scale:g}",
                        f"{site.dropout_p:g}",
                        "yes" if site.has_bias else "no",
                        "fused" if site.fused_base else "stacked",
                        kernels,
                    )
                )
            lines += _table(rows)
        for group in self.shared:
            lines.append(f"  one shared-input op (x read once by shrink and dA): {', '.join(group)}")
        if self.skipped:
            lines.append("left alone:")
            lines += _table([("module", "reason")] + [(s.module_path or "<root>", s.reason) for s in self.skipped])
        return "\n".join(lines)


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "f")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


@contextlib.contextmanager
def collect_reports() -> Iterator[ExplainReport]:
    """Collect what the backend does inside the ``with`` block into one report."""
    report = ExplainReport()
    _COLLECTORS.append(report)
    try:
        yield report
    finally:
        _COLLECTORS.remove(report)


def publish(sites: list[LoRASite], skipped: list[SkippedLinear], kernels: list[str], shared: Sequence[Sequence[str]] = ()) -> None:
    """Called by the backend once per compiled graph (``shared``: module paths of each shared-input group)."""
    for report in _COLLECTORS:
        report.matched += sites
        report.shared += [list(g) for g in shared]
        report.skipped += skipped
        report.kernels += kernels
        report.graphs += 1
