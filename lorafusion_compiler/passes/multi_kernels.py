"""Pick the kernel set of multi-adapter ops already in the graph and share their routing tables.

Matches: ``torch.ops.lorafusion.multi_lora_linear`` nodes (emitted by
``runtime.MultiAdapterModel``, whose eager forward runs the per-adapter torch loop).
Rewrites: their ``kernels`` argument to the backend's choice (fused Triton on CUDA). Sites on
the fused kernels that share one ``adapter_rows`` node and one row count get one
``torch.ops.lorafusion.multi_routing`` node, inserted before the first of them, as their
``routing`` argument: the piece tables are built once per forward instead of once per launch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from ..ops import multi_lora_linear as _register_ops  # noqa: F401  (defines the op)
from ..ops import multi_routing as _register_routing  # noqa: F401  (defines the routing op)

__all__ = ["MULTI_KERNELS_ARG", "MULTI_ROUTING_ARG", "select_multi_kernels"]

MULTI_KERNELS_ARG = 9
"""Position of ``kernels`` in the op's schema."""
MULTI_ROUTING_ARG = 11
"""Position of ``routing`` (the packed piece tables) in the op's schema."""
_ROWS_ARG = 7


def _row_count(x: fx.Node) -> object | None:
    """Rows (tokens) of a site's input from its example value (a SymInt under dynamic shapes), or None."""
    value = x.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    return value.numel() // value.shape[-1]


def select_multi_kernels(gm: fx.GraphModule, choose: Callable[[torch.Tensor | None, torch.Tensor | None], str]) -> int:
    """Set ``kernels`` of every multi-adapter op to ``choose(example x, example lora_a[0])`` and give
    fused sites a shared routing node; returns how many ops were set."""
    count = 0
    routing: dict[tuple[fx.Node, str], fx.Node] = {}
    op = torch.ops.lorafusion.multi_lora_linear.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not op:
            continue
        args = list(node.args)
        args[MULTI_KERNELS_ARG] = choose(args[0].meta.get("example_value"), args[3][0].meta.get("example_value"))
        rows, m = args[_ROWS_ARG], _row_count(args[0])
        if args[MULTI_KERNELS_ARG] != "torch" and args[MULTI_ROUTING_ARG] is None and m is not None:
            key = (rows, str(m))
            if key not in routing:
                with gm.graph.inserting_before(node):
                    routing[key] = gm.graph.call_function(torch.ops.lorafusion.multi_routing.default, (rows, args[0]))
            args[MULTI_ROUTING_ARG] = routing[key]
        node.args = tuple(args)
        count += 1
    if count:
        gm.recompile()
    return count
