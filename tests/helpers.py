"""Shared test helpers: a verbose relative-error check, a seeded dropout for eager references, the
compiled-vs-eager comparison and a skip marker for tests of CP-SAT's own results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafusion_compiler.ops.dropout_mask import keep_mask

__all__ = ["requires_ortools", "assert_rel_close", "rel_error", "zero_fills_in", "SeededDropout", "use_seeded_dropout", "adapter_grads", "compare_compiled_to_eager", "LossOf",
           "ADAPTERS", "peft_with_adapters"]


def _cpsat_imports() -> bool:
    try:
        from ortools.sat.python import cp_model  # noqa: F401
    except ImportError:
        return False
    return True


requires_ortools = pytest.mark.skipif(
    not _cpsat_imports(),
    reason="needs OR-Tools' CP-SAT (ortools, a dependency of the package: pip install ortools); CI checks it is installed")
"""For tests of CP-SAT's own results: skipped where ortools is missing (the lent GPU machines); everything
else falls back to the greedy packing there and still runs."""


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaN anywhere gives inf)."""
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def zero_fills_in(fn) -> list[str]:
    """The aten zeros/fill ops that ``fn()`` dispatches (what would be fill kernel launches on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    assert record.ops, "fn dispatched no aten op at all"
    return [op for op in record.ops if "zero" in op or "fill" in op]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "tensor") -> None:
    """Fail with shapes, the relative error and the worst element when ‖a−e‖/‖e‖ > tol."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    err = rel_error(actual, expected)
    if not err <= tol:
        diff = (actual.detach().double() - expected.detach().double()).abs()
        worst = diff.argmax().item()
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; worst element {worst}: "
            f"{actual.reshape(-1)[worst].item():.6g} vs {expected.reshape(-1)[worst].item():.6g} (shape {tuple(actual.shape)})"
        )


class SeededDropout(nn.Module):
    """Dropout drawing its seed like ``lora_linear`` does, so eager and compiled runs share masks."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
        rows = x.numel() // x.shape[-1]
        mask = keep_mask(seed, self.p, rows, x.shape[-1]).reshape(x.shape)
        return x * mask.to(x.dtype) * (1.0 / (1.0 - self.p))


def use_seeded_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` inside ``model`` for a SeededDropout (same p and mode); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                parent.register_module(name, SeededDropout(child.p).train(child.training))
                count += 1
    return count


class LossOf(nn.Module):
    """Wraps a causal LM so the compiled module returns one tensor: the LM loss of ``ids``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the gradients of every trainable parameter, by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def compare_compiled_to_eager(model: nn.Module, *inputs: torch.Tensor, inner_backend: str = "aot_eager", tol: float = 1e-5, seed: int = 0, options: dict | None = None):
    """Compile ``model`` with the lorafusion backend, run forward+backward, then the same eagerly.

    Dropout modules of PEFT are swapped for ``SeededDropout`` for the eager run, so both
    runs draw the same masks. Asserts the outputs and every trainable gradient agree to
    ``tol`` (relative) and returns the backend's ``ExplainReport``.
    """
    from lorafusion_compiler.report import collect_reports

    compiled = torch.compile(model, backend="lorafusion", options={"inner_backend": inner_backend, **(options or {})})
    torch.manual_seed(seed)
    with collect_reports() as report:
        out = compiled(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (out.double() * probe).sum().backward()
    got = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    use_seeded_dropout(model)
    torch.manual_seed(seed)
    ref = model(*inputs)
    (ref.double() * probe).sum().backward()
    want = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    assert out.dtype == ref.dtype, f"output dtype {out.dtype} != eager {ref.dtype}"
    assert_rel_close(out, ref, tol, "output")
    assert got.keys() == want.keys() and want, f"trainable grads differ: {sorted(got)} vs {sorted(want)}"
    for name in want:
        assert_rel_close(got[name], want[name], tol, f"grad of {name}")
    return report


ADAPTERS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=8), "c": dict(r=3, lora_alpha=6), "unused": dict(r=2, lora_alpha=2)}
"""LoRA settings of the adapters of ``peft_with_adapters`` (different ranks and scales)."""


def peft_with_adapters(names: list[str]) -> nn.Module:
    """The embedded tiny LLaMa with PEFT adapters ``names`` (from ``ADAPTERS``) on q/v/down_proj;
    A and B drawn from one fixed generator, so every copy of the model is identical."""
    from peft import LoraConfig, get_peft_model

    from lorafusion_compiler.product.tiny_llama import build_tiny_llama

    targets = ["q_proj", "v_proj", "down_proj"]
    first, *rest = names
    model = get_peft_model(build_tiny_llama(seed=1), LoraConfig(target_modules=targets, **ADAPTERS[first]), adapter_name=first)
    for name in rest:
        model.add_adapter(name, LoraConfig(target_modules=targets, **ADAPTERS[name]))
    g = torch.Generator().manual_seed(5)
    for pname, param in model.named_parameters():
        if "lora_" in pname:
            param.data = torch.randn(param.shape, generator=g) * 0.05
    return model
