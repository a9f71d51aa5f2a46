"""Triton code generation for the split-at-r LoRA kernels.

``render`` turns a :class:`KernelSpec` into Triton source from the Jinja templates in
``templates/``; ``cache`` writes each source to disk and imports it once per key;
``autotune`` picks a tile configuration per shape bucket; ``kernels`` holds the five
launchers (the ``"triton"`` kernel set of ``lorafusion_compiler.ops``).
"""

from .render import KERNEL_NAMES, KernelSpec, kernel_sources, rank_bucket, render

__all__ = ["KERNEL_NAMES", "KernelSpec", "kernel_sources", "rank_bucket", "render"]
