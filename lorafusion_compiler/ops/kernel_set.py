"""Which code computes the five split-at-r kernels: the torch reference, generated Triton, or
generated Triton with the two fused GEMMs in Gluon.

A kernel set is a module exposing ``shrink``, ``base_expand``, ``ds_db``, ``da``, ``dx`` and
``saves_keep_bits`` with the signatures of ``lorafusion_compiler.ops.reference``.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["KERNEL_SETS", "get_kernel_set"]

KERNEL_SETS = ("torch", "triton", "gluon")
"""Valid names: ``"torch"`` (reference, any device), ``"triton"`` (GPU, or CPU under TRITON_INTERPRET=1;
``codegen/triton_set.py``: the generated kernels, and cuBLAS for the mask-free products at larger ranks)
and ``"gluon"`` (``"triton"`` with base_expand and dx in Gluon on Hopper where they apply,
``codegen/gluon/kernel_set.py``; ``"auto"`` picks it for bf16 with CUDA graphs on Hopper)."""


def get_kernel_set(name: str) -> ModuleType:
    """Return the module implementing the kernels named ``name`` (one of ``KERNEL_SETS``)."""
    if name == "torch":
        from . import reference

        return reference
    if name == "triton":
        from ..codegen import triton_set

        return triton_set
    if name == "gluon":
        from ..codegen.gluon import kernel_set

        return kernel_set
    raise ValueError(f"unknown kernel set {name!r}; choose one of {KERNEL_SETS}")
