"""Which code computes the five split-at-r kernels: the torch reference, generated Triton, generated
Triton with the memory-bound kernels in Gluon, or with the fused GEMMs in Gluon too.

A kernel set is a module exposing ``shrink``, ``base_expand``, ``ds_db``, ``da``, ``dx`` and
``saves_keep_bits`` with the signatures of ``lorafusion_compiler.ops.reference``.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["KERNEL_SETS", "get_kernel_set"]

KERNEL_SETS = ("torch", "triton", "gluon", "gluon-gemms")
"""Valid names: ``"torch"`` (reference, any device), ``"triton"`` (GPU, or CPU under TRITON_INTERPRET=1;
``codegen/triton_set.py``: the generated kernels, and cuBLAS for the mask-free products at larger ranks),
``"gluon"`` (``"triton"`` with shrink, dA and dS/dB in Gluon on Hopper where they apply, and the dropout
mask stored once per step; ``codegen/gluon/kernel_set.py``; ``"auto"`` picks it for bf16 with CUDA graphs
on Hopper) and ``"gluon-gemms"`` (``"gluon"`` with base_expand and dX in Gluon too: faster on a cool GPU,
slower at the power cap; ``codegen/gluon/gemm_set.py``)."""


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
    if name == "gluon-gemms":
        from ..codegen.gluon import gemm_set

        return gemm_set
    raise ValueError(f"unknown kernel set {name!r}; choose one of {KERNEL_SETS}")
