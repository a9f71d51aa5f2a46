"""Rewrite matched LoRA sites into ``torch.ops.lorafusion.lora_linear``.

Rewrites (replacement)::

    out = base(x) + scale * (dropout(x) Aᵀ) Bᵀ        ->  out = lora_linear(x, W, bias, A, B, ...)[0]
    out = other + scale * (dropout(x) Aᵀ) Bᵀ          ->  out = other + lora_linear(x, None, None, A, B, ...)[0]

The op computes the split-at-r kernel set (``lorafusion_compiler.ops``) and owns its
autograd; every node the site used is removed, everything else is left to the inner backend.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops import lora_linear as _register_ops  # noqa: F401  (defines torch.ops.lorafusion.*)
from .lora_pattern import LoRASite

__all__ = ["rewrite_lora_sites"]


def rewrite_lora_sites(gm: fx.GraphModule, sites: list[LoRASite], kernels: list[str], *, deterministic: bool) -> None:
    """Replace each site (``kernels[i]`` names the kernel set of ``sites[i]``) and recompile ``gm``."""
    graph = gm.graph
    for site, kernel_set in zip(sites, kernels, strict=True):
        n = site.nodes
        args = (n.x, n.weight, n.bias, n.lora_a, n.lora_b, site.scale, site.dropout_p, site.out_dtype, kernel_set, deterministic)
        with graph.inserting_before(n.output):
            call = graph.call_function(torch.ops.lorafusion.lora_linear.default, args)
            y = graph.call_function(operator.getitem, (call, 0))
        for new in (call, y):
            new.meta["nn_module_stack"] = n.output.meta.get("nn_module_stack", {})
        y.meta["example_value"] = n.output.meta.get("example_value")
        n.output.replace_all_uses_with(y)
        for node in reversed(n.chain):
            if not node.users:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
