"""Which code computes the five split-at-r kernels: the torch reference or generated Triton.

A kernel set is a module exposing ``shrink``, ``base_expand``, ``ds_db``, ``da`` and ``dx``
with the signatures of ``lorafusion_compiler.ops.reference``.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["KERNEL_SETS", "get_kernel_set"]

KERNEL_SETS = ("torch", "triton")
"""Valid names: ``"torch"`` (reference, any device) and ``"triton"`` (GPU, or CPU under TRITON_INTERPRET=1)."""


def get_kernel_set(name: str) -> ModuleType:
    """Return the module implementing the kernels named ``name`` (one of ``KERNEL_SETS``)."""
    if name == "torch":
        from . import reference

        return reference
    if name == "triton":
        from ..codegen import kernels

        return kernels
    raise ValueError(f"unknown kernel set {name!r}; choose one of {KERNEL_SETS}")
