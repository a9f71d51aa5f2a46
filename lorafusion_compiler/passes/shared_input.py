"""Group LoRA sites that read one input without dropout (the q/k/v and gate/up projections).

Matches (search): two or more matched sites with the same x node, no dropout (p == 0 as
applied), the base GEMM fused, one kernel set, one adapter dtype and one output dtype.

Extra check: every operand of the group (weights, biases, A, B: placeholders or attributes in
Dynamo graphs) is defined before the group's first output in graph order, so one op placed
there reads them all; a group that fails it stays per-site.

Rewrites to (``rewrite.rewrite_lora_sites``): one ``torch.ops.lorafusion.lora_linear_shared``
whose shrink and dA read x once for the whole group (``ops/lora_linear_shared.py``).
"""

from __future__ import annotations

import torch.fx as fx

from .lora_pattern import LoRASite

__all__ = ["shared_input_groups"]


def shared_input_groups(graph: fx.Graph, sites: list[LoRASite], kernels: list[str]) -> list[list[int]]:
    """Indices into ``sites`` of each group of two or more sites that can share one op, in graph order."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    by_key: dict[tuple, list[int]] = {}
    for i, site in enumerate(sites):
        if site.dropout_p != 0.0 or not site.fused_base:
            continue
        key = (site.nodes.x, kernels[i], site.adapter_dtype, site.out_dtype)
        by_key.setdefault(key, []).append(i)
    groups = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        first_use = min(order[sites[i].nodes.output] for i in members)
        operands = [n for i in members for n in _operands(sites[i]) if n is not None]
        if all(order[n] < first_use for n in operands):
            groups.append(sorted(members, key=lambda i: order[sites[i].nodes.output]))
    return sorted(groups, key=lambda g: order[sites[g[0]].nodes.output])


def _operands(site: LoRASite) -> tuple[fx.Node | None, ...]:
    n = site.nodes
    return n.weight, n.bias, n.lora_a, n.lora_b
