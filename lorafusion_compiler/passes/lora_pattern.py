"""Find LoRA sites in a Dynamo FX graph.

Matches (search)::

    delta = scale * ((dropout?(cast?(x)) @ Aᵀ) @ Bᵀ)      # scale on either side, or `/ d`, or absent
    out   = base(x) + delta   (either operand order)      # base(x) = x @ Wᵀ (+ bias), W frozen
    out   = out.to(x.dtype)?                                # PEFT's cast back over fp32 adapters

``@ Wᵀ`` is any spelling ``fx_views.as_linear`` reads. When the other add operand is
not a frozen linear of the same x (a second adapter stacked on one base, or a base
computed elsewhere) the delta alone is a site with ``fused_base=False``.

Extra checks (a site that fails one is left untouched and reported with the reason):
A and B 2-D with matching rank, no bias on A or B; scale a Python number; dropout with
a constant p in [0, 1), constant training flag, not in-place; every intermediate
(cast, dropout, x·Aᵀ, S·Bᵀ) used only inside the branch; A and B not computed from x;
the base weight and bias frozen; output shape = x.shape[:-1] + (N,).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .fx_views import LinearView, as_add, as_cast, as_dropout, as_linear, as_scaled, example_value, module_path

__all__ = ["LoRASite", "SiteNodes", "SkippedLinear", "PatternResult", "find_lora_sites"]


@dataclass
class SiteNodes:
    """Graph handles of one site (used by the rewrite; not part of reports)."""

    x: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    lora_a: fx.Node
    lora_b: fx.Node
    output: fx.Node
    """The node whose uses the rewritten op takes over."""
    chain: list[fx.Node]
    """Nodes computed only for this site, in graph order; removed by the rewrite."""


@dataclass(frozen=True, kw_only=True)
class LoRASite:
    """One matched LoRA layer: y = x Wᵀ + bias + scale · dropout(x) Aᵀ Bᵀ."""

    module_path: str
    """Dotted path of the module (``base_model.model.layers.0.self_attn.q_proj``; ``""`` = root)."""
    rank: int
    in_features: int
    """K: features of x."""
    out_features: int
    """N: features of y."""
    x_shape: tuple[int, ...]
    dtype: torch.dtype
    """dtype of x and of the base weight."""
    adapter_dtype: torch.dtype
    out_dtype: torch.dtype
    scale: float
    dropout_p: float
    """Dropout probability applied (0.0 in eval mode)."""
    declared_dropout_p: float
    """Dropout probability written in the graph (what the module is configured with)."""
    training: bool
    has_bias: bool
    fused_base: bool
    """True when the base GEMM is fused into the op; False for a LoRA term added onto
    something else (a stacked adapter)."""
    x_requires_grad: bool
    nodes: SiteNodes = field(repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class SkippedLinear:
    """A linear (or LoRA look-alike) that was left untouched, and why."""

    module_path: str
    reason: str


@dataclass(frozen=True)
class PatternResult:
    """What ``find_lora_sites`` found in one graph."""

    sites: list[LoRASite]
    skipped: list[SkippedLinear]


class _Reject(Exception):
    """The branch looks like LoRA but a check failed; ``nodes`` get the reason in reports."""

    def __init__(self, reason: str, nodes: list[fx.Node]):
        super().__init__(reason)
        self.reason = reason
        self.nodes = nodes


@dataclass
class _Delta:
    root: fx.Node
    x: fx.Node
    lora_a: fx.Node
    lora_b: fx.Node
    scale: float
    p: float
    declared_p: float
    training: bool
    chain: list[fx.Node]


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    """True when ``target`` is an ancestor of (or is) ``node``."""
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        if cur is target:
            return True
        if cur in seen:
            continue
        seen.add(cur)
        todo.extend(cur.all_input_nodes)
    return False


def _match_delta(root: fx.Node) -> _Delta | None:
    """Read ``root`` as scale·(dropout(x) Aᵀ) Bᵀ; None when it is not LoRA-shaped at all."""
    scaled = as_scaled(root)
    inner, scale = scaled if scaled is not None else (root, 1.0)
    lin_b = as_linear(inner)
    if lin_b is None:
        return None
    lin_a = as_linear(lin_b.input)
    if lin_a is None:
        below = lin_b.input
        if isinstance(below, fx.Node) and any(as_linear(a) for a in below.all_input_nodes):
            raise _Reject(f"'{getattr(below.target, '__name__', below.target)}' between lora_A and lora_B", [lin_b.node])
        return None
    involved = [lin_a.node, lin_b.node]
    if _number(scale) is None:
        raise _Reject(f"scale {scale!r} is not a Python number (non-scalar or tensor scale)", involved)
    if lin_a.bias is not None or lin_b.bias is not None:
        raise _Reject("lora_A or lora_B has a bias", involved)
    chain = [lin_a.node, *lin_a.extra_nodes, lin_b.node, *lin_b.extra_nodes] + ([root] if scaled else [])
    x, p, declared_p, training = lin_a.input, 0.0, 0.0, True
    dropout = as_dropout(x)
    if dropout is not None:
        chain.append(x)
        x, p_raw, training, inplace = dropout
        p = _number(p_raw)
        if p is None or not 0.0 <= p < 1.0 or not isinstance(training, bool):
            raise _Reject(f"dropout p={p_raw!r} / training={training!r} are not constants with p in [0, 1)", involved)
        if inplace:
            raise _Reject("in-place dropout on the LoRA input", involved)
        declared_p = p
    cast = as_cast(x)
    a_value, b_value = example_value(lin_a.weight), example_value(lin_b.weight)
    if cast is not None and a_value is not None and cast[1] == a_value.dtype:
        chain.append(x)
        x = cast[0]
    _check_delta(x, lin_a, lin_b, a_value, b_value, chain, root, involved)
    return _Delta(root, x, lin_a.weight, lin_b.weight, float(scale), p if training else 0.0, declared_p, training, chain)


def _check_delta(x, lin_a: LinearView, lin_b: LinearView, a_value, b_value, chain, root, involved) -> None:
    x_value = example_value(x)
    if x_value is None or a_value is None or b_value is None:
        raise _Reject("operands have no recorded shapes", involved)
    if a_value.dim() != 2 or b_value.dim() != 2 or b_value.shape[1] != a_value.shape[0]:
        raise _Reject(f"lora_A {tuple(a_value.shape)} and lora_B {tuple(b_value.shape)} are not [r,K] and [N,r]", involved)
    if x_value.dim() < 1 or x_value.shape[-1] != a_value.shape[1] or not x_value.dtype.is_floating_point:
        raise _Reject(f"input {tuple(x_value.shape)} {x_value.dtype} does not fit lora_A {tuple(a_value.shape)}", involved)
    if a_value.dtype != b_value.dtype:
        raise _Reject(f"lora_A is {a_value.dtype} but lora_B is {b_value.dtype}", involved)
    for node in chain:
        if node is not root and len(node.users) != 1:
            raise _Reject(f"intermediate '{node.name}' is used outside the LoRA branch", involved)
    for weight in (lin_a.weight, lin_b.weight):
        if _depends_on(weight, x):
            raise _Reject(f"'{weight.name}' is computed from the LoRA input", involved)


def _as_frozen_base(node: object, x: fx.Node) -> LinearView | None:
    """``node`` as a frozen linear of ``x`` used only by the add, else None."""
    base = as_linear(node)
    if base is None or base.input is not x or len(base.node.users) != 1:
        return None
    for param in (base.weight, base.bias):
        value = example_value(param)
        if param is not None and (value is None or value.requires_grad):
            return None
    return base


def _site(delta: _Delta, base: LinearView | None, add: fx.Node, order: dict[fx.Node, int]) -> LoRASite:
    x_value, a_value, b_value = (example_value(n) for n in (delta.x, delta.lora_a, delta.lora_b))
    chain, output = list(delta.chain), delta.root
    if base is not None:
        chain += [base.node, *base.extra_nodes, add]
        output = add
        users = list(add.users)
        cast = as_cast(users[0]) if len(users) == 1 else None
        if cast is not None and cast[1] == x_value.dtype:
            output = users[0]
            chain.append(output)
    out_value = example_value(output)
    expected = (*x_value.shape[:-1], b_value.shape[0])
    if out_value is None or tuple(out_value.shape) != tuple(expected):
        raise _Reject(f"output shape {None if out_value is None else tuple(out_value.shape)} is not {expected}", [delta.root])
    return LoRASite(
        module_path=module_path(add if base is not None else delta.root),
        rank=int(a_value.shape[0]),
        in_features=int(a_value.shape[1]),
        out_features=int(b_value.shape[0]),
        x_shape=tuple(int(s) for s in x_value.shape),
        dtype=x_value.dtype,
        adapter_dtype=a_value.dtype,
        out_dtype=out_value.dtype,
        scale=delta.scale,
        dropout_p=delta.p,
        declared_dropout_p=delta.declared_p,
        training=delta.training,
        has_bias=base is not None and base.bias is not None,
        fused_base=base is not None,
        x_requires_grad=bool(x_value.requires_grad),
        nodes=SiteNodes(
            x=delta.x,
            weight=base.weight if base else None,
            bias=base.bias if base else None,
            lora_a=delta.lora_a,
            lora_b=delta.lora_b,
            output=output,
            chain=sorted(set(chain), key=order.__getitem__),
        ),
    )


def find_lora_sites(gm: fx.GraphModule) -> PatternResult:
    """Match every LoRA site of ``gm`` (see the module docstring); the graph is not changed."""
    sites: list[LoRASite] = []
    reasons: dict[fx.Node, str] = {}
    claimed: set[fx.Node] = set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}  # graph position, to sort each site's nodes
    for node in list(gm.graph.nodes):
        operands = as_add(node)
        if operands is None:
            continue
        try:
            site = _match_add(node, operands, claimed, order)
        except _Reject as reject:
            for n in reject.nodes:
                reasons.setdefault(n, reject.reason)
            continue
        if site is not None:
            sites.append(site)
            claimed.update(site.nodes.chain)
    skipped = []
    for node in gm.graph.nodes:
        if node not in claimed and as_linear(node) is not None:
            reason = reasons.get(node, "plain linear: no LoRA branch is added to it")
            skipped.append(SkippedLinear(module_path=module_path(node), reason=reason))
    return PatternResult(sites, skipped)


def _match_add(add: fx.Node, operands: tuple, claimed: set[fx.Node], order: dict[fx.Node, int]) -> LoRASite | None:
    """Try both operand orders: fused base first, then a delta-only site."""
    deltas = []
    for delta_side, other in (operands, operands[::-1]):
        if not isinstance(delta_side, fx.Node) or delta_side in claimed:
            continue
        delta = _match_delta(delta_side)
        if delta is None:
            continue
        base = _as_frozen_base(other, delta.x)
        if base is not None and base.node not in claimed:
            return _site(delta, base, add, order)
        deltas.append(delta)
    return _site(deltas[0], None, add, order) if deltas else None
