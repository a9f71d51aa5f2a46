"""The one CUDA-graph capture helper of the benchmarks (GPU only)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["capture", "replay_of_calls"]


def capture(step: Callable[[], Any], *, clear: Iterable[torch.Tensor] = ()) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``step`` twice on a side stream (compiles, tunes, warms the allocator), set the ``.grad``
    of ``clear`` to None (so the captured backward allocates its gradients inside the graph), then
    capture one call. Returns (graph, what the captured call returned); replay with ``graph.replay()``.

    Garbage is collected first, before the warm-up and before the capture: an autograd node keeps
    the stream it was created on, and a leaf's gradient accumulator outlives its graph while an
    unreachable cycle still holds that graph. If such a stale accumulator (made on the legacy
    default stream, e.g. by an earlier eager check) is reused inside the capture, the end of the
    captured backward makes the legacy stream wait on the capturing one and CUDA aborts the
    capture (``cudaErrorStreamCaptureImplicit``; pytorch/pytorch#164302). Whether a cycle was
    still uncollected depended on the garbage collector's timing, so the failure was intermittent.
    (``torch.cuda.graph`` no longer collects before capturing unless
    ``torch.compiler.config.force_cudagraph_gc`` is set.)"""
    gc.collect()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in clear:
        t.grad = None
    gc.collect()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def replay_of_calls(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    """The ``replay`` of a CUDA graph of ``calls`` back-to-back calls of ``fn`` (warmed up, tuned and
    compiled first by ``capture``): one replay times ``calls`` calls without their host launch cost.
    The returned function keeps ``fn`` (so the operands it closes over) and the captured outputs
    alive: the graph reads and writes their memory on every replay, and a caller that only holds
    the replay must not let the allocator hand that memory to other tensors."""
    graph, outputs = capture(lambda: [fn() for _ in range(calls)])

    def replay(_alive: tuple = (fn, outputs)) -> None:
        graph.replay()

    return replay
