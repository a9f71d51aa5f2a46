"""Small readers that recognise one Dynamo-graph op each and return its operands.

Dynamo spells the same math several ways (``F.linear`` vs ``x @ W.T``; ``a * s`` vs
``s * a``; ``x.to(dtype=...)`` vs ``x.float()``). Each reader below accepts every
spelling of one op and returns ``None`` for anything else, so the LoRA matcher in
``lora_pattern`` reads like the math it looks for.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = [
    "LinearView",
    "as_linear",
    "as_add",
    "as_scaled",
    "as_dropout",
    "as_cast",
    "example_value",
    "module_path",
]

_LINEAR_FNS = {torch._C._nn.linear, F.linear}
_MATMUL_FNS = {operator.matmul, torch.matmul}
_ADD_FNS = {operator.add, torch.add, operator.iadd}
_MUL_FNS = {operator.mul, torch.mul}
_DIV_FNS = {operator.truediv, torch.div}
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


@dataclass(frozen=True)
class LinearView:
    """``out = input @ weight.T (+ bias)``: weight is the [out, in] node, bias may be None."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    extra_nodes: tuple[fx.Node, ...] = ()
    """Helper nodes of this spelling (the ``.T`` of ``x @ W.T``), removable with it."""


def example_value(node: Any) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for ``node`` (None for constants or unknowns)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def _is_call(node: Any, fns: set) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in fns


def _is_method(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _transposed(node: Any) -> fx.Node | None:
    """If ``node`` is ``w.T`` / ``w.t()`` / ``w.transpose(0, 1)`` of a 2-D ``w``, return ``w``."""
    if not isinstance(node, fx.Node):
        return None
    base = None
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        base = node.args[0]
    elif _is_method(node, "t") or _is_call(node, {torch.t}):
        base = node.args[0]
    elif (_is_method(node, "transpose") or _is_call(node, {torch.transpose})) and len(node.args) == 3:
        if {node.args[1], node.args[2]} in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1}):
            base = node.args[0]
    value = example_value(base)
    return base if value is not None and value.dim() == 2 else None


def as_linear(node: Any) -> LinearView | None:
    """Read ``F.linear(x, W, b)`` or ``x @ W.T`` (matmul of a transposed 2-D weight)."""
    if _is_call(node, _LINEAR_FNS):
        args = list(node.args) + [None] * (3 - len(node.args))
        bias = node.kwargs.get("bias", args[2])
        return LinearView(node, args[0], node.kwargs.get("weight", args[1]), bias)
    if (_is_call(node, _MATMUL_FNS) or _is_method(node, "matmul")) and len(node.args) == 2:
        weight = _transposed(node.args[1])
        if weight is not None:
            return LinearView(node, node.args[0], weight, None, (node.args[1],))
    return None


def as_add(node: Any) -> tuple[Any, Any] | None:
    """Read ``a + b`` (any spelling, alpha 1) as its two operands."""
    if (_is_call(node, _ADD_FNS) or _is_method(node, "add")) and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1]
    return None


def as_scaled(node: Any) -> tuple[fx.Node, Any] | None:
    """Read ``t * s``, ``s * t`` or ``t / d`` as ``(t, scale)``; scale is whatever the other operand is.

    The caller decides whether the scale is acceptable (a Python number) or not.
    """
    if (_is_call(node, _MUL_FNS) or _is_method(node, "mul")) and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, fx.Node) and example_value(a) is not None and (not isinstance(b, fx.Node) or _bigger(a, b)):
            return a, b
        if isinstance(b, fx.Node):
            return b, a
    if (_is_call(node, _DIV_FNS) or _is_method(node, "div")) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, (int, float)) and b != 0:
            return a, 1.0 / b
    return None


def _bigger(a: fx.Node, b: fx.Node) -> bool:
    """True when a's example value has at least as many dims as b's (b is then the scale)."""
    va, vb = example_value(a), example_value(b)
    return va is not None and (vb is None or va.dim() >= vb.dim())


def as_dropout(node: Any) -> tuple[fx.Node, Any, Any, Any] | None:
    """Read ``F.dropout(x, p, training, inplace)`` as ``(x, p, training, inplace)``."""
    if not _is_call(node, {F.dropout, torch.dropout}):
        return None
    names = ("input", "p", "training", "inplace")
    defaults = (None, 0.5, True, False)
    values = [node.kwargs.get(n, node.args[i] if i < len(node.args) else d) for i, (n, d) in enumerate(zip(names, defaults))]
    if node.target is torch.dropout:  # torch.dropout(input, p, train)
        values[3] = False
    return values[0], values[1], values[2], values[3]


def as_cast(node: Any) -> tuple[fx.Node, torch.dtype] | None:
    """Read a pure dtype cast (``x.to(dtype)``, ``x.to(dtype=...)``, ``x.float()``...) as ``(x, dtype)``."""
    if not isinstance(node, fx.Node) or node.op != "call_method":
        return None
    if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return node.args[0], _CAST_METHODS[node.target]
    if node.target == "to":
        rest = list(node.args[1:])
        dtype = node.kwargs.get("dtype", rest.pop(0) if rest else None)
        if isinstance(dtype, torch.dtype) and not rest and set(node.kwargs) <= {"dtype"}:
            return node.args[0], dtype
    return None


_MODULE_KEY = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]|\._modules\['([^']+)'\]|\['([^']+)'\]")


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced ``node`` (``""`` for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    raw = re.sub(r"^L\['[^']+'\]", "", raw)  # the compiled module itself is the root
    path = _MODULE_KEY.sub(lambda m: "." + (m.group(1) or m.group(2) or m.group(3)), raw)
    return path.lstrip(".")
