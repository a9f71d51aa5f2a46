"""One profiled call of a benchmark step: the profiler's op tables and a Chrome trace
(``trace_summary.py`` reads the trace: GPU time per kernel family, the longest kernels).

Used by ``e2e.py --profile-dir`` (one training step per variant) and ``layer.py --profile-dir``
(one CUDA-graph replay of a layer's forward+backward per variant).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["profile_call"]


def profile_call(call: Callable[[], object], path: str, *, hot_calls: int = 0) -> None:
    """Write the op table (sorted by host time, then by GPU time) to ``path`` and the Chrome trace
    (``<path minus .txt>.trace.json``: every kernel in order, with its grid) of one ``call()``; with
    ``hot_calls``, that many unprofiled calls run back to back first, so the profiled one meets the
    clocks of a sustained run instead of an idle GPU's."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(hot_calls):
        call()
    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        call()
        if gpu:
            torch.cuda.synchronize()
    prof.export_chrome_trace(path.removesuffix(".txt") + ".trace.json")
    table = prof.key_averages()
    with open(path, "w") as f:
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        f.write("\n")
        f.write(table.table(sort_by="self_device_time_total", row_limit=100, max_name_column_width=90))
