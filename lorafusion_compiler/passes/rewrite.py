"""Rewrite matched LoRA sites into ``torch.ops.lorafusion.lora_linear``.

Rewrites (replacement)::

    out = base(x) + scale * (dropout(x) Aᵀ) Bᵀ        ->  out = lora_linear(x, W, bias, A, B, ...)[0]
    out = other + scale * (dropout(x) Aᵀ) Bᵀ          ->  out = other + lora_linear(x, None, None, A, B, ...)[0]
    out_i = base_i(x) + s_i * (x A_iᵀ) B_iᵀ, i = 1..G  ->  out_i = lora_linear_shared(x, [W_i], [b_i], [A_i], [B_i], ...)[0][i]
      (a group of ``shared_input.shared_input_groups``: one x, no dropout)

The op computes the split-at-r kernel set (``lorafusion_compiler.ops``) and owns its
autograd; every node the site used is removed, everything else is left to the inner backend.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx as fx

from ..ops import lora_linear as _register_ops  # noqa: F401  (defines torch.ops.lorafusion.*)
from ..ops import lora_linear_shared as _register_shared  # noqa: F401
from .lora_pattern import LoRASite, SiteNodes

__all__ = ["rewrite_lora_sites"]


def rewrite_lora_sites(gm: fx.GraphModule, sites: list[LoRASite], kernels: list[str], *, deterministic: bool,
                       overlap_backward: bool = False, groups: Sequence[Sequence[int]] = ()) -> None:
    """Replace each site (``kernels[i]`` names the kernel set of ``sites[i]``) and recompile ``gm``;
    the sites of each group in ``groups`` (indices into ``sites``) become one shared op.
    ``deterministic`` and ``overlap_backward`` are passed to every op (``LoRAFusionConfig``)."""
    graph = gm.graph
    grouped = {i for group in groups for i in group}
    for group in groups:
        first = sites[group[0]].nodes
        members = [sites[i].nodes for i in group]
        args = (first.x, [n.weight for n in members], [n.bias for n in members], [n.lora_a for n in members],
                [n.lora_b for n in members], [sites[i].scale for i in group], sites[group[0]].out_dtype,
                kernels[group[0]], deterministic, overlap_backward)
        with graph.inserting_before(first.output):
            call = graph.call_function(torch.ops.lorafusion.lora_linear_shared.default, args)
            ys = graph.call_function(operator.getitem, (call, 0))
            outs = [graph.call_function(operator.getitem, (ys, j)) for j in range(len(group))]
        for new in (call, ys):
            new.meta["nn_module_stack"] = first.output.meta.get("nn_module_stack", {})
        for n, y in zip(members, outs):
            _take_over(graph, n, y)
    for i, (site, kernel_set) in enumerate(zip(sites, kernels, strict=True)):
        if i in grouped:
            continue
        n = site.nodes
        args = (n.x, n.weight, n.bias, n.lora_a, n.lora_b, site.scale, site.dropout_p, site.out_dtype, kernel_set, deterministic,
                overlap_backward)
        with graph.inserting_before(n.output):
            call = graph.call_function(torch.ops.lorafusion.lora_linear.default, args)
            y = graph.call_function(operator.getitem, (call, 0))
        call.meta["nn_module_stack"] = n.output.meta.get("nn_module_stack", {})
        _take_over(graph, n, y)
    graph.lint()
    gm.recompile()


def _take_over(graph: fx.Graph, n: SiteNodes, y: fx.Node) -> None:
    """Route the uses of the site's output to ``y`` and erase the nodes only the site used."""
    y.meta["nn_module_stack"] = n.output.meta.get("nn_module_stack", {})
    y.meta["example_value"] = n.output.meta.get("example_value")
    n.output.replace_all_uses_with(y)
    for node in reversed(n.chain):
        if not node.users:
            graph.erase_node(node)
