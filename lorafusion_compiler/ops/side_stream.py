"""dA beside dX: the backward's memory-bound dA kernel runs on a second CUDA stream while the
dX GEMM runs on the current one (backend option ``overlap_backward``, experimental, off by default).

Nothing in the op waits for dA, and dX is a persistent GEMM that leaves SMs idle while its
programs start and in its last wave of tiles. Queued on a side stream just before dX, dA's
programs run on those SMs. Measured on an H200 (M=4096, r=16, CUDA-graph replays, µs per
LLaMa-8B layer of 7 sites): dA then dX 2884 (p=0) / 3075 (p=0.1); dA beside dX 2751 / 2949.
At p > 0, dX then regenerates the dropout mask itself instead of reading dA's keep bits, which
costs less than the overlap gains. In the 8-layer training step no gain was measured yet
(docs/kernel-notes/split-kernels.md), hence off by default.

Ordering: the side stream first waits for all work queued so far on the current stream, so
dS is ready. Before the op returns, the current stream waits for the side stream, so callers
see single-stream semantics. Memory stays safe without ``record_stream``:

* a tensor allocated on the side stream is used on the current stream only after that join;
* freed side-stream memory is reused only after the side stream's next wait, and that wait
  orders it after every use queued before the free.

CUDA-graph capture records the fork and the join like any other event dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, TypeVar

import torch

__all__ = ["beside", "side_stream"]

A = TypeVar("A")
B = TypeVar("B")

_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    """The side stream of ``device``. None for a non-CUDA device, or during a CUDA-graph capture
    before the stream exists: a stream is never created inside a capture."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _STREAMS.get(index)
    if stream is None and not torch.cuda.is_current_stream_capturing():
        stream = _STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def beside(stream: Optional[torch.cuda.Stream], side: Callable[[], A], main: Callable[[], B]) -> tuple[A, B]:
    """``(side(), main())``. With a ``stream``, ``side`` is queued on that stream and ``main`` on the
    current stream, and the current stream waits for both before this returns. Without a stream,
    both run one after the other on the current stream, ``side`` first."""
    if stream is None:
        first = side()
        return first, main()
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        first = side()
    second = main()
    current.wait_stream(stream)
    return first, second
