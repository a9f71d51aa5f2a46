"""Kernel launches without Triton's per-call binder.

``kernel[grid](*args, **meta)`` binds and specialises every argument on every call before it
reaches the compiled kernel: ~20 µs of host time for a Triton kernel, 8–9 µs more than this path
for the Gluon GEMMs (H200 VM, BENCHMARKS.md, fourteenth session). ``launch`` keeps the compiled kernel of each specialisation (the constexprs, the
launch options, the device and ``arg_signature`` of the runtime arguments) after its first
launch and calls it directly from then on. Used by the ``tl`` launchers (``kernels.py``) and the
Gluon ones (``gluon/``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton

from .autotune import interpreting

__all__ = ["arg_signature", "launch"]

_KNOBS = getattr(triton, "knobs", None)
_COMPILED: dict[tuple, object] = {}


def arg_signature(args: tuple) -> tuple:
    """What Triton specialises a launch on: tensor dtype + 16-byte alignment, int size/divisibility,
    a TMA descriptor's dtype, block shape, shared layout (Gluon) and base alignment."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
        elif hasattr(a, "block_shape"):  # triton.tools or Gluon TensorDescriptor
            sig.append((a.base.dtype, tuple(a.block_shape), getattr(a, "layout", None), a.base.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            sig.append((bool, a))
        elif isinstance(a, int):
            sig.append((a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
        else:
            sig.append(type(a))
    return tuple(sig)


def launch(kernel, grid: tuple[int, ...], args: tuple, meta: Mapping[str, object], options: Mapping[str, int]) -> object:
    """``kernel[grid](*args, **meta, **options)``: ``args`` are the runtime arguments (positional,
    first in the kernel's signature), ``meta`` its constexpr parameters by name and ``options`` the
    launch options (``num_warps``, ``num_stages``). Returns the compiled kernel. An empty grid
    (a zero-size input) launches nothing."""
    if 0 in grid:  # M == 0: nothing to compute, and CUDA rejects empty grids
        return None
    if interpreting() or _KNOBS is None:
        return kernel[grid](*args, **meta, **options)
    key = (kernel, tuple(meta.items()), tuple(options.items()), torch.cuda.current_device(), arg_signature(args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = kernel[grid](*args, **meta, **options)
        return compiled
    full = (*args, *(meta[name] for name in kernel.arg_names[len(args):]))
    stream = torch.cuda.current_stream().cuda_stream
    grid = (*grid, 1, 1)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *full),
                 _KNOBS.runtime.launch_enter_hook, _KNOBS.runtime.launch_exit_hook, *full)
    return compiled
