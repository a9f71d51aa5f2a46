"""Pick the kernel set of multi-adapter ops already in the graph.

Matches: ``torch.ops.lorafusion.multi_lora_linear`` nodes (emitted by
``runtime.MultiAdapterModel``, whose eager forward runs the per-adapter torch loop).
Rewrites: their ``kernels`` argument to the backend's choice (fused Triton on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from ..ops import multi_lora_linear as _register_ops  # noqa: F401  (defines the op)

__all__ = ["MULTI_KERNELS_ARG", "select_multi_kernels"]

MULTI_KERNELS_ARG = 9
"""Position of ``kernels`` in the op's schema."""


def select_multi_kernels(gm: fx.GraphModule, choose: Callable[[torch.Tensor | None, torch.Tensor | None], str]) -> int:
    """Set ``kernels`` of every multi-adapter op to ``choose(example x, example lora_a[0])``; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.lorafusion.multi_lora_linear.default:
            args = list(node.args)
            args[MULTI_KERNELS_ARG] = choose(args[0].meta.get("example_value"), args[3][0].meta.get("example_value"))
            node.args = tuple(args)
            count += 1
    if count:
        gm.recompile()
    return count
