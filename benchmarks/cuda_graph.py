"""The one CUDA-graph capture helper of the benchmarks (GPU only)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["capture"]


def capture(step: Callable[[], Any], *, clear: Iterable[torch.Tensor] = ()) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``step`` twice on a side stream (compiles, tunes, warms the allocator), set the ``.grad``
    of ``clear`` to None (so the captured backward allocates its gradients inside the graph), then
    capture one call. Returns (graph, what the captured call returned); replay with ``graph.replay()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in clear:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
