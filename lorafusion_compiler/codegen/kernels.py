"""Launchers of the five generated Triton kernels: the ``"triton"`` kernel set.

Same functions, signatures and return dtypes as ``lorafusion_compiler.ops.reference``
(x [M,K], W [N,K], bias [N], A [r,K], B [N,r], S/dS [M,r]; any strides). The dropout seed
is an int64 one-element tensor on the device, read inside the kernels (no host sync), so
every launcher is CUDA-graph capturable once its shape bucket has been tuned.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from ..ops.dropout_mask import drop_threshold
from .autotune import TileConfig, cdiv, grid_programs, interpreting, next_pow2, num_sms, run_tuned
from .cache import load_kernel
from .launch import launch
from .render import KernelSpec, rank_bucket

try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # older Triton: pointer loads only
    _TensorDescriptor = None

__all__ = ["shrink", "base_expand", "ds_db", "da", "dx", "multi_forward", "multi_backward"]

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _dtype_name(name: str, t: torch.Tensor) -> str:
    if t.dtype not in _DTYPE_NAMES:
        raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16 or float32")
    return _DTYPE_NAMES[t.dtype]


def _check(name: str, t: torch.Tensor, shape: tuple[int | None, ...], device: torch.device) -> None:
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple('*' if s is None else s for s in shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _dropout_args(seed: torch.Tensor, p: float, device: torch.device) -> tuple[int, float]:
    """(threshold, 1/(1-p)) runtime arguments; validates p and the seed tensor."""
    threshold = drop_threshold(p)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be a one-element int64 tensor, got dtype {seed.dtype} with {seed.numel()} elements")
    if seed.device != device:
        raise ValueError(f"seed is on {seed.device}, expected {device} (it is read inside the kernels)")
    return threshold, 1.0 / (1.0 - p)


def _split(blocks: int, other_blocks: int, device: torch.device, cfg: TileConfig) -> int:
    """Power-of-two split of ``blocks`` so that the grid has about ``cfg.split_per_sm`` programs per SM."""
    want = cdiv(cfg.split_per_sm * num_sms(device), max(other_blocks, 1))
    return max(1, min(next_pow2(want), next_pow2(blocks)))


def _launch(kernel, grid: tuple[int, ...], args: tuple, cfg: TileConfig, **constexprs: int) -> None:
    """``kernel[grid](*args, **constexprs, **cfg.kwargs)`` through ``launch.launch`` (no per-call binder)."""
    launch(kernel, grid, args, {**cfg.meta, **constexprs}, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


@lru_cache(maxsize=None)
def _prepare(kernel: str, **fields) -> tuple[object, str, int]:
    """(compiled-on-demand kernel, spec key, rank bucket) for ``kernel`` and KernelSpec ``fields`` (cached)."""
    spec = KernelSpec(**fields).for_kernel(kernel)
    return load_kernel(kernel, spec), spec.key, spec.rank_bucket


def shrink(x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, p: float, *,
           deterministic: bool = False) -> torch.Tensor:
    """S = dropout(x) Aᵀ: x [M,K], A [r,K] -> S [M,r] fp32 (the mask is never stored).

    Always deterministic (K-split partial sums to fp32 slots summed in a fixed order); ``deterministic``
    exists for the shared signature.
    """
    _check("x", x, (None, None), x.device)
    m, k = x.shape
    _check("lora_a", lora_a, (None, k), x.device)
    r = lora_a.shape[0]
    threshold, inv_keep = _dropout_args(seed, p, x.device)
    kernel, key, rb = _prepare("shrink", dtype=_dtype_name("x", x), adapter_dtype=_dtype_name("lora_a", lora_a),
                               dropout=p != 0.0, rank_bucket=rank_bucket(r), aligned8=k % 8 == 0)
    dev = x.device

    def launch(cfg: TileConfig) -> torch.Tensor:
        m_blocks, k_blocks = cdiv(m, cfg["BLOCK_M"]), cdiv(k, cfg["BLOCK_K"])
        k_split = _split(k_blocks, m_blocks, dev, cfg)
        out = torch.empty(k_split, m, r, dtype=torch.float32, device=dev)
        _launch(kernel, (m_blocks, k_split),
                (x, lora_a, out, seed, m, k, r, threshold, inv_keep, m * r, *x.stride(), *lora_a.stride(), r, 1),
                cfg, BLOCK_R=rb, K_SPLIT=k_split)
        return out

    out = run_tuned("shrink", key, (m, k), rb, launch, operand_bytes=x.element_size())
    return out[0] if out.shape[0] == 1 else out.sum(0)


def _check_bits(keep_bits: torch.Tensor | None, m: int, k: int, p: float, device: torch.device) -> None:
    """Validate a keep-bits buffer (``dropout_mask.new_keep_bits``) for an [m, k] mask of dropout p."""
    if keep_bits is None:
        return
    if p == 0.0 or k % 8:
        raise ValueError(f"keep_bits given with p={p}, K={k}: bits exist only for p != 0 and K % 8 == 0 (pass None)")
    if keep_bits.dtype != torch.uint8 or tuple(keep_bits.shape) != (m, k // 8) or not keep_bits.is_contiguous():
        raise ValueError(f"keep_bits must be a contiguous uint8 [{m}, {k // 8}] tensor, got {keep_bits.dtype} "
                         f"{tuple(keep_bits.shape)}")
    if keep_bits.device != device:
        raise ValueError(f"keep_bits is on {keep_bits.device}, expected {device}")


def _tma_ok(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether the GEMM operands can be read through TMA descriptors (Hopper+, 16-byte aligned rows)."""
    if weight is None or interpreting() or not x.is_cuda or _TensorDescriptor is None:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9 or x.dtype != weight.dtype:
        return False
    return _tma_rows(x) and _tma_rows(weight)


def _tma_rows(t: torch.Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can address: unit column stride, 16-byte aligned start and rows."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


LOWRANK_BLOCK_R = {("base_expand", False): 32, ("dx", False): 32, ("base_expand", True): 64, ("dx", True): 16}
"""Rank chunk of the low-rank prologue per (kernel, multi-adapter), capped at the rank bucket.
H100, 8192x4096x4096, p=0.1, whole op forward+backward, graphed, variants replayed in interleaved
rounds (ms): single r=64 1.103 with chunks of 64 (no 128x256 persistent config fits in shared
memory next to the TMA-store staging tile: the tuner fell back to 128x128 / 256x128 tiles), 1.032
at 32, 1.071 at 16; single r=128 1.230 at 64, 1.228 at 32. Multi-adapter (base_expand, dx) at
4 adapters r 8..64: (64, 16) 1.080, (32, 16) 1.103, (32, 32) 1.114, (16, 16) 1.114; 64 adapters x
128 tokens: (64, 16) 1.236, (32, 16) 1.271, (32, 32) 1.259 (multi dx at 64: 44 spilled registers)."""


def _lowrank_gemm(
    kernel_name: str, fields: dict, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    low_l: torch.Tensor, low_r: torch.Tensor | None, lscale: float, seed: torch.Tensor, threshold: int, out: torch.Tensor,
    *, route: Callable[[TileConfig], tuple] | None = None, bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M,P] = x[M,Q] Wm[Q,P] (+ bias) + epi(low_l[M,R] low_r[R,P]); see lowrank_gemm.py.jinja.

    Wm is ``weight.t()`` for base_expand (W [N,K]) and ``weight`` for dx. Multi-adapter
    (``fields["multi"]``): ``low_r``, ``lscale`` and ``threshold`` come per row piece from the
    adapter tables, ``seed`` holds one seed per adapter, and ``route(cfg)`` returns the routing
    arguments (piece table, block index, int64 and fp32 adapter tables) for that tile config.
    ``bits``: dx's keep bits (``fields["keep_bits"]``). An empty ``out`` (M = 0 or P = 0) launches nothing:
    there is nothing to compute, and TMA has no descriptor for an empty tensor.
    """
    if out.numel() == 0:
        return out
    tma = _tma_ok(x, weight)
    # the epilogue stores through a TMA descriptor too (H100: ~1% faster base_expand / dx at M=4096 with
    # warm L2, level with cold L2; docs/kernel-notes/fused-gemms.md) when out is 16-bit with 16-byte aligned rows: its
    # staging tile takes BLOCK_M x BLOCK_P x 2 bytes of shared memory (fp32 tiles left no config that fits)
    tma_store = tma and out.element_size() == 2 and _tma_rows(out)
    kernel, key, rb = _prepare(kernel_name, **fields, tma=tma, tma_store=tma_store)
    multi = route is not None
    m, p = out.shape
    # multi: R = 0 (each piece's adapter sets its rank; an argument equal to 1 would become a constexpr)
    r = 0 if multi else low_l.shape[1]
    q = x.shape[1] if weight is not None else 0
    wm = low_l if weight is None else (weight.t() if kernel_name == "base_expand" else weight)
    low_r_strides = (0, 0) if multi else low_r.stride()
    bias_ = bias if bias is not None else out
    block_r = min(rb, LOWRANK_BLOCK_R[kernel_name, multi])

    def launch(cfg: TileConfig) -> torch.Tensor:
        grid = (grid_programs(cfg, cdiv(m, cfg["BLOCK_M"]) * cdiv(p, cfg["BLOCK_P"]), out.device),)
        xa, wa = x, wm
        if tma:
            xa = _TensorDescriptor.from_tensor(x, [cfg["BLOCK_M"], cfg["BLOCK_Q"]])
            w_block = [cfg["BLOCK_P"], cfg["BLOCK_Q"]] if kernel_name == "base_expand" else [cfg["BLOCK_Q"], cfg["BLOCK_P"]]
            wa = _TensorDescriptor.from_tensor(weight, w_block)
        oa = _TensorDescriptor.from_tensor(out, [cfg["BLOCK_M"], cfg["BLOCK_P"]]) if tma_store else out
        _launch(kernel, grid,
                (xa, wa, bias_, low_l, low_l if multi else low_r, oa, seed, bits if bits is not None else out,
                 m, p, q, r, lscale, threshold,
                 *x.stride(), *wm.stride(), *low_l.stride(), *low_r_strides, *out.stride(),
                 bits.stride(0) if bits is not None else 0, *(route(cfg) if multi else ())),
                cfg, BLOCK_R=block_r)
        return out

    return run_tuned(kernel_name, key, (m, p, q), rb, launch, operand_bytes=x.element_size())


def base_expand(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, s_act: torch.Tensor,
    lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype,
) -> torch.Tensor:
    """y = x Wᵀ + bias + scale·S Bᵀ -> [M,N] in ``out_dtype``; without W only the LoRA term."""
    _check("x", x, (None, None), x.device)
    m, k = x.shape
    _check("s_act", s_act, (m, None), x.device)
    r = s_act.shape[1]
    _check("lora_b", lora_b, (None, r), x.device)
    n = lora_b.shape[0]
    if weight is not None:
        _check("weight", weight, (n, k), x.device)
    if bias is not None:
        if weight is None:
            raise ValueError("bias given without weight")
        _check("bias", bias, (n,), x.device)
    fields = dict(dtype=_dtype_name("x", x), adapter_dtype=_dtype_name("lora_b", lora_b),
                  has_weight=weight is not None, has_bias=bias is not None, rank_bucket=rank_bucket(r))
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    dummy_seed = s_act  # never read: base_expand has no dropout
    return _lowrank_gemm("base_expand", fields, x, weight, bias,
                         s_act, lora_b.t(), float(scale), dummy_seed, 0, out)


def ds_db(
    dy: torch.Tensor, lora_b: torch.Tensor, s_act: torch.Tensor, scale: float, *, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s·dY B [M,r] (fp32) and dB = s·dYᵀ S [N,r] (B's dtype) from one read of dY [M,N].

    ``deterministic``: partial sums go to per-program workspace slots summed in a fixed order
    (bitwise reproducible, extra memory (M/BLOCK_M)·N·r·4 bytes) instead of fp32 atomics.
    """
    _check("dy", dy, (None, None), dy.device)
    m, n = dy.shape
    _check("lora_b", lora_b, (n, None), dy.device)
    r = lora_b.shape[1]
    _check("s_act", s_act, (m, r), dy.device)
    kernel, key, rb = _prepare("ds_db", dtype=_dtype_name("dy", dy), adapter_dtype=_dtype_name("lora_b", lora_b),
                               rank_bucket=rank_bucket(r), deterministic=deterministic)
    dev = dy.device

    def launch(cfg: TileConfig) -> tuple[torch.Tensor, torch.Tensor]:
        m_blocks, n_blocks = cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"])
        n_split = _split(n_blocks, m_blocks, dev, cfg)
        if deterministic:
            d_s = torch.empty(n_split, m, r, dtype=torch.float32, device=dev)
            d_b = torch.empty(m_blocks, n, r, dtype=torch.float32, device=dev)
        else:  # one zero-filled buffer for both atomic targets: one fill launch, not two
            both = torch.zeros((m + n) * r, dtype=torch.float32, device=dev)
            d_s, d_b = both[: m * r].view(1, m, r), both[m * r:].view(1, n, r)
        _launch(kernel, (m_blocks, n_split),
                (dy, lora_b, s_act, d_s, d_b, m, n, r, float(scale), m * r, n * r,
                 *dy.stride(), *lora_b.stride(), *s_act.stride(), r, 1, r, 1),
                cfg, BLOCK_R=rb, N_SPLIT=n_split)
        return d_s, d_b

    d_s, d_b = run_tuned("ds_db", key, (m, n, r), rb, launch, operand_bytes=dy.element_size())
    d_s = d_s[0] if d_s.shape[0] == 1 else d_s.sum(0)
    d_b = d_b[0] if d_b.shape[0] == 1 else d_b.sum(0)
    return d_s, (d_b if d_b.dtype == lora_b.dtype else d_b.to(lora_b.dtype))


def da(
    x: torch.Tensor, ds: torch.Tensor, seed: torch.Tensor, p: float, a_dtype: torch.dtype, *, deterministic: bool = False,
    keep_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """dA = dSᵀ x̃: dS [M,r], x [M,K] -> [r,K] in ``a_dtype``, the mask regenerated from ``seed``.

    ``deterministic``: per-split workspace slots summed in a fixed order instead of atomics;
    ``keep_bits`` (``dropout_mask.new_keep_bits``): the mask is also stored there, for ``dx``.
    """
    _check("x", x, (None, None), x.device)
    m, k = x.shape
    _check("ds", ds, (m, None), x.device)
    r = ds.shape[1]
    threshold, inv_keep = _dropout_args(seed, p, x.device)
    _check_bits(keep_bits, m, k, p, x.device)
    kernel, key, rb = _prepare("da", dtype=_dtype_name("x", x), adapter_dtype=_DTYPE_NAMES.get(a_dtype, "float32"),
                               dropout=p != 0.0, rank_bucket=rank_bucket(r), aligned8=k % 8 == 0,
                               deterministic=deterministic, keep_bits=keep_bits is not None)
    dev = x.device

    def launch(cfg: TileConfig) -> torch.Tensor:
        k_blocks, m_blocks = cdiv(k, cfg["BLOCK_K"]), cdiv(m, cfg["BLOCK_M"])
        m_split = _split(m_blocks, k_blocks, dev, cfg)
        if m_split == 1:
            out = torch.empty(1, r, k, dtype=a_dtype, device=dev)
        elif deterministic:
            out = torch.empty(m_split, r, k, dtype=torch.float32, device=dev)
        else:
            out = torch.zeros(1, r, k, dtype=torch.float32, device=dev)
        _launch(kernel, (k_blocks, m_split),
                (x, ds, seed, out, keep_bits if keep_bits is not None else out, m, k, r, threshold, inv_keep, r * k,
                 *x.stride(), *ds.stride(), k, 1, keep_bits.stride(0) if keep_bits is not None else 0),
                cfg, BLOCK_R=rb, M_SPLIT=m_split)
        return out

    out = run_tuned("da", key, (m, k, r), rb, launch, operand_bytes=x.element_size())
    out = out[0] if out.shape[0] == 1 else out.sum(0)
    return out if out.dtype == a_dtype else out.to(a_dtype)


def dx(
    dy: torch.Tensor, weight: torch.Tensor | None, ds: torch.Tensor, lora_a: torch.Tensor,
    seed: torch.Tensor, p: float, out_dtype: torch.dtype, *, keep_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """dX = dY W + m ⊙ (dS A)/(1-p) -> [M,K] in ``out_dtype``; without W only the LoRA term.
    ``keep_bits``: the mask as ``da`` stored it (else regenerated from ``seed``)."""
    _check("dy", dy, (None, None), dy.device)
    m, n = dy.shape
    _check("ds", ds, (m, None), dy.device)
    r = ds.shape[1]
    _check("lora_a", lora_a, (r, None), dy.device)
    k = lora_a.shape[1]
    if weight is not None:
        _check("weight", weight, (n, k), dy.device)
    threshold, inv_keep = _dropout_args(seed, p, dy.device)
    _check_bits(keep_bits, m, k, p, dy.device)
    base = weight if weight is not None else dy
    fields = dict(dtype=_dtype_name("weight" if weight is not None else "dy", base),
                  adapter_dtype=_dtype_name("lora_a", lora_a), has_weight=weight is not None,
                  dropout=p != 0.0, rank_bucket=rank_bucket(r), aligned8=k % 8 == 0, keep_bits=keep_bits is not None)
    out = torch.empty(m, k, dtype=out_dtype, device=dy.device)
    return _lowrank_gemm("dx", fields, dy, weight, None, ds, lora_a, inv_keep, seed, threshold, out, bits=keep_bits)


def __getattr__(name: str):
    """``multi_forward`` / ``multi_backward`` (the multi-adapter launchers of this kernel set) live in
    ``multi.py``, which imports this module's helpers: resolved on first use, so either module can be
    imported first."""
    if name in ("multi_forward", "multi_backward"):
        from . import multi

        globals()[name] = value = getattr(multi, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
