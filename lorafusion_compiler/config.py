"""The one configuration of the ``lorafusion`` backend.

``torch.compile(model, backend="lorafusion", options={...})`` maps ``options`` onto
:class:`LoRAFusionConfig`. Each field can also be set by an environment variable
``LORAFUSION_<FIELD>`` (e.g. ``LORAFUSION_DUMP_DIR=/tmp/k``); precedence is
options > environment > default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LoRAFusionConfig", "KERNEL_CHOICES"]

KERNEL_CHOICES = ("auto", "triton", "gluon", "gluon-gemms", "torch")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, kw_only=True)
class LoRAFusionConfig:
    """Options of the ``lorafusion`` torch.compile backend."""

    inner_backend: str = "inductor"
    """Backend that compiles the rewritten graph: ``"inductor"`` (default), ``"aot_eager"``,
    ``"eager"`` or any name ``torch._dynamo.list_backends()`` knows."""

    kernels: str = "auto"
    """Who computes the LoRA kernels: ``"triton"`` (generated Triton kernels; on a CPU only
    under ``TRITON_INTERPRET=1``), ``"torch"`` (the reference ops), or ``"auto"``: Triton for
    CUDA tensors of fp16/bf16/fp32 when Triton imports, torch otherwise, and ``"gluon"`` instead of
    Triton for bf16 on a Hopper GPU when ``cudagraphs`` is on (and Triton is a release the Gluon
    kernels were validated on, ``backend.GLUON_TRITON_VERSIONS``). ``"gluon"``: the Triton kernels with
    the memory-bound ones (shrink, dA, dS/dB) in Gluon on Hopper where they apply (bf16, ranks ≤ 64)
    and, at p > 0, the dropout mask computed once per step (``codegen/gluon/kernel_set.py``); more host
    work per launch, so it pays only when the step is CUDA-graph replayed. ``"gluon-gemms"``: ``"gluon"``
    with the two fused GEMMs (base_expand, dX) in warp-specialised Gluon too (``codegen/gluon/gemm_set.py``):
    0.99–1.00× cuBLAS per GEMM on a cool H200, but at the GPU's power cap, where a training step runs,
    they spend more energy than Triton's and the step is slower (BENCHMARKS.md, twenty-second session)."""

    rewrite: bool = True
    """Rewrite matched LoRA sites. False only analyses (explain still lists the sites)."""

    dump_dir: str | None = None
    """If set, every generated kernel's source and a ``manifest.json`` (site -> kernels,
    specialization key) are written into this directory."""

    deterministic: bool = False
    """Avoid atomics so adapter gradients (and S, whose split sums the Gluon shrink otherwise adds
    with atomics) are bitwise reproducible."""

    cudagraphs: bool = False
    """Record the compiled forward and backward graphs as CUDA graphs (Inductor's cudagraph
    trees, as ``mode="reduce-overhead"`` does for Inductor) and replay them: removes the host
    cost of every launch. Only with ``inner_backend="inductor"``. As with reduce-overhead,
    outputs of one step are overwritten by the next: clone what you keep (e.g. ``loss.item()``
    or ``loss.detach().clone()``) and zero gradients with ``set_to_none=True``."""

    share_inputs: bool = True
    """LoRA sites without dropout that read the same input (a block's q/k/v, and gate/up) become one
    ``lorafusion::lora_linear_shared`` op: their A matrices are stacked so one shrink and one dA
    kernel read x once for all of them instead of once per site. Same results as separate sites, up
    to rounding. On by default since the twenty-second session: the 8-layer LLaMa-8B step at p = 0 ran
    0.4–1.1% faster with it at the H200's power cap (BENCHMARKS.md); before, round-robin timing on an
    H100 could not resolve a gain."""

    overlap_backward: bool = False
    """Experimental. On a GPU, each LoRA site's backward runs its memory-bound dA kernel on a
    second CUDA stream beside its dX GEMM (and dX regenerates the dropout mask instead of reading
    dA's keep bits). Same results; faster per layer on an H200, not yet measurably faster in the
    8-layer training step (docs/backend.md), hence off by default. Single-adapter and
    ``share_inputs`` sites; multi-adapter ops keep one stream."""

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={self.kernels!r} is not one of {KERNEL_CHOICES}")
        if not isinstance(self.inner_backend, str) or not self.inner_backend:
            raise ValueError(f"inner_backend={self.inner_backend!r} must be a backend name such as 'inductor'")
        for name in ("rewrite", "deterministic", "cudagraphs", "share_inputs", "overlap_backward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.cudagraphs and self.inner_backend != "inductor":
            raise ValueError(f"cudagraphs=True needs inner_backend='inductor', got inner_backend={self.inner_backend!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> "LoRAFusionConfig":
        """Build the config from ``torch.compile`` options, falling back to ``LORAFUSION_*`` variables."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        options = dict(options or {})
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(f"unknown lorafusion option(s) {unknown}; valid options are {sorted(fields)}")
        values: dict[str, Any] = {}
        for name, field in fields.items():
            env_name = f"LORAFUSION_{name.upper()}"
            if name in options:
                values[name] = options[name]
            elif env_name in environ:
                values[name] = _parse_env(env_name, environ[env_name], field.default)
        return cls(**values)


def _parse_env(env_name: str, raw: str, default: Any) -> Any:
    """Parse an environment string into the type of the field's default."""
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{env_name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")
    return raw or None if default is None else raw
