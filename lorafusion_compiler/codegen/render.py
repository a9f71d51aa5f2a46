"""Kernel specialisation keys and Jinja rendering of the Triton sources.

A :class:`KernelSpec` names one specialisation of the five split-at-r LoRA kernels; each
kernel reads only the fields it depends on (:meth:`KernelSpec.for_kernel`), so e.g. the
shrink kernel is shared by layers that differ only in their bias. Tile shapes are not part
of the source: they are ``tl.constexpr`` arguments chosen per shape bucket by ``autotune``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from ..ops.dropout_mask import PHILOX_ROUNDS

__all__ = ["KERNEL_NAMES", "KernelSpec", "rank_bucket", "render", "kernel_sources"]

KERNEL_NAMES = ("shrink", "base_expand", "ds_db", "da", "dx")
"""The five kernels, in forward-then-backward order."""

_TEMPLATE = {"shrink": "shrink", "base_expand": "lowrank_gemm", "ds_db": "ds_db", "da": "da", "dx": "lowrank_gemm"}
_DTYPES = ("float16", "bfloat16", "float32")
_RANK_BUCKETS = (16, 32, 64, 128, 256)
_USES = {
    "shrink": ("dtype", "adapter_dtype", "dropout", "rank_bucket", "aligned8", "multi", "adapters_aligned"),
    "base_expand": ("dtype", "adapter_dtype", "has_weight", "has_bias", "rank_bucket", "tma", "tma_store", "multi", "adapters_aligned"),
    "ds_db": ("dtype", "adapter_dtype", "rank_bucket", "deterministic", "multi", "adapters_aligned"),
    "da": ("dtype", "adapter_dtype", "dropout", "rank_bucket", "aligned8", "deterministic", "multi", "keep_bits"),
    "dx": ("dtype", "adapter_dtype", "has_weight", "dropout", "rank_bucket", "aligned8", "tma", "tma_store", "multi", "adapters_aligned",
           "keep_bits"),
}


def rank_bucket(rank: int) -> int:
    """Padded rank a kernel is compiled for: the next power of two, at least 16 (tl.dot's minimum)."""
    if not 1 <= rank <= _RANK_BUCKETS[-1]:
        raise ValueError(f"LoRA rank {rank} is outside the supported range 1..{_RANK_BUCKETS[-1]}")
    return max(16, 1 << (rank - 1).bit_length())


@dataclass(frozen=True, kw_only=True)
class KernelSpec:
    """One specialisation of the kernel set (what a rendered source depends on)."""

    dtype: str = "bfloat16"
    """Dtype of x, W and dY: "float16", "bfloat16" or "float32" (the tensor-core operand dtype)."""
    adapter_dtype: str = "float32"
    """Dtype of A and B (cast to ``dtype`` tile by tile inside the kernels)."""
    has_weight: bool = True
    """The frozen base W is present (False: LoRA-only term, e.g. a stacked adapter)."""
    has_bias: bool = False
    """The base layer has a bias (added in the base+expand epilogue)."""
    dropout: bool = False
    """p != 0: the keep-mask is regenerated from the Philox seed in shrink, dA and dX."""
    needs_dx: bool = True
    """x requires a gradient: the dX kernel is part of the set."""
    rank_bucket: int = 16
    """Padded rank (16, 32, 64, 128 or 256); selects the tile configurations."""
    aligned8: bool = True
    """K % 8 == 0: one Philox call serves 8 adjacent columns (else one call per element)."""
    deterministic: bool = False
    """No atomics: partial sums go to workspace slots that are reduced in a fixed order."""
    tma: bool = False
    """GEMM main loop reads x/dY and W through Hopper TMA descriptors (GPU, sm_90+, aligned rows)."""
    tma_store: bool = False
    """GEMM epilogue stores the output tile through a TMA descriptor (with tma, for 16-bit outputs whose
    rows are 16-byte aligned)."""
    multi: bool = False
    """Multi-adapter: each row piece reads its adapter (A/B pointers and strides, rank, scale,
    threshold, 1/(1-p), seed) from device tables instead of the scalar arguments."""
    keep_bits: bool = False
    """dA stores the keep-mask it regenerates as bits (uint8 [M, K/8]) and dX reads them instead of
    regenerating the mask (needs dropout and aligned8; ``ops.dropout_mask.new_keep_bits``)."""
    adapters_aligned: bool = False
    """Multi only: every A and B starts at a 16-byte-aligned address and its rows hold a multiple
    of 8 elements (K % 8 == 0, every rank % 8 == 0), so the kernels may issue 16-byte vector loads
    of the adapter tiles (table-read addresses carry no alignment the compiler could prove)."""

    def __post_init__(self) -> None:
        for name in ("dtype", "adapter_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"KernelSpec.{name}={getattr(self, name)!r}; expected one of {_DTYPES}")
        if self.rank_bucket not in _RANK_BUCKETS:
            raise ValueError(f"KernelSpec.rank_bucket={self.rank_bucket!r}; expected one of {_RANK_BUCKETS}")
        if self.adapters_aligned and not self.multi:
            raise ValueError("KernelSpec.adapters_aligned=True needs multi=True")
        if self.keep_bits and not (self.dropout and self.aligned8):
            raise ValueError("KernelSpec.keep_bits=True needs dropout=True and aligned8=True (K % 8 == 0)")
        if self.tma_store and not self.tma:
            raise ValueError("KernelSpec.tma_store=True needs tma=True")
        if self.has_bias and not self.has_weight:
            raise ValueError("KernelSpec.has_bias=True needs has_weight=True")

    @property
    def key(self) -> str:
        """Stable string naming this specialisation (used in cache file names and dump manifests)."""
        short = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
        flags = "".join(
            f"{tag}{int(getattr(self, name))}"
            for tag, name in (("w", "has_weight"), ("b", "has_bias"), ("p", "dropout"), ("dx", "needs_dx"),
                              ("a8_", "aligned8"), ("det", "deterministic"), ("tma", "tma"), ("ts", "tma_store"),
                              ("al", "adapters_aligned"), ("kb", "keep_bits"))
        )
        multi = "-multi" if self.multi else ""
        return f"{short[self.dtype]}-{short[self.adapter_dtype]}-r{self.rank_bucket}-{flags}{multi}"

    @property
    def compute_dtype(self) -> str:
        """Triton dtype of tensor-core operands: ``dtype`` for 16-bit inputs, else float32."""
        return f"tl.{self.dtype}"

    @property
    def dot_precision(self) -> str | None:
        """``input_precision`` of the dots: exact fp32 ("ieee") for fp32 inputs, default otherwise."""
        return "ieee" if self.dtype == "float32" else None

    def for_kernel(self, kernel: str) -> "KernelSpec":
        """This spec with the fields ``kernel`` does not depend on reset to their defaults."""
        if kernel not in _USES:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNEL_NAMES}")
        defaults = KernelSpec()
        changes = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(self) if f.name not in _USES[kernel]}
        if kernel == "base_expand" and not self.has_weight:
            changes["has_bias"] = False
        return dataclasses.replace(self, **changes)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@lru_cache(maxsize=None)
def render(kernel: str, spec: KernelSpec) -> str:
    """Python/Triton source of ``kernel`` (one of ``KERNEL_NAMES``) for ``spec``; defines ``{kernel}_kernel``."""
    spec = spec.for_kernel(kernel)
    template = _environment().get_template(f"{_TEMPLATE[kernel]}.py.jinja")
    return template.render(spec=spec, kernel=kernel, philox_rounds=PHILOX_ROUNDS)


def kernel_sources(spec: KernelSpec) -> dict[str, str]:
    """Kernel name -> rendered source for every kernel ``spec`` needs (dX only when ``needs_dx``)."""
    return {name: render(name, spec) for name in KERNEL_NAMES if name != "dx" or spec.needs_dx}
