"""Every Triton kernel output and gradient against the float64 torch reference (same seed -> same mask).

On a CPU these run in the Triton interpreter, so shapes are small and odd (masked edges,
K % 8 != 0 for the per-element Philox path, ranks that are not powers of two).
Tolerances: fp32 kernels use exact fp32 dots (input_precision="ieee"; the interpreter's
dots are fp32-exact), so errors are fp32 rounding over K ≤ 130 terms: ≤ 1e-5. fp16 rounds
every operand to a 11-bit mantissa (unit roundoff 4.9e-4) and the outputs once more, so a
normwise error of a few 1e-4 is expected; 3e-3 leaves headroom without hiding a wrong term
(a missing mask or scale gives errors ≥ 1e-1).
"""

from __future__ import annotations

import pytest
import torch

from lorafusion_compiler.codegen import kernels as tk
from lorafusion_compiler.ops import reference as ref
from lorafusion_compiler.ops.dropout_mask import keep_mask

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm()).item()


def make(m, k, n, r, dtype, device, *, bias=True, adapter_dtype=torch.float32, seed=1234):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n + r)
    def rnd(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dt)
    return {
        "x": rnd(m, k), "w": rnd(n, k, s=k ** -0.5), "bias": rnd(n) if bias else None,
        "a": rnd(r, k, dt=adapter_dtype, s=k ** -0.5), "b": rnd(n, r, dt=adapter_dtype), "dy": rnd(m, n),
        "seed": torch.tensor(seed, dtype=torch.int64, device=device),
    }


CASES = [  # (M, K, N, r, p, bias, weight)
    (37, 70, 45, 5, 0.25, True, True),
    (37, 70, 45, 5, 0.0, False, True),
    (40, 72, 33, 1, 0.25, False, True),
    (33, 64, 50, 24, 0.1, True, True),
    (20, 48, 30, 24, 0.25, False, False),
    (16, 40, 24, 40, 0.0, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}r{}p{}b{}w{}".format(*c))
def test_kernels_match_reference(case, dtype, device):
    m, k, n, r, p, bias, weight = case
    t = make(m, k, n, r, dtype, device, bias=bias)
    w = t["w"] if weight else None
    bias_t = t["bias"] if weight else None
    f64 = {key: (v.double() if v is not None and v.is_floating_point() else v) for key, v in t.items()}
    s, s_ref = tk.shrink(t["x"], t["a"], t["seed"], p), ref.shrink(f64["x"], f64["a"], t["seed"], p)
    assert s.dtype == torch.float32 and s.shape == (m, r)  # the fp32 sums, whatever the adapters' dtype
    y = tk.base_expand(t["x"], w, bias_t, s, t["b"], 2.5, dtype)
    y_ref = ref.base_expand(f64["x"], None if w is None else f64["w"], None if bias_t is None else f64["bias"],
                            s_ref, f64["b"], 2.5, torch.float64)
    ds, db = tk.ds_db(t["dy"], t["b"], s, 2.5)
    ds_ref, db_ref = ref.ds_db(f64["dy"], f64["b"], s_ref, 2.5)
    da = tk.da(t["x"], ds, t["seed"], p, t["a"].dtype)
    da_ref = ref.da(f64["x"], ds_ref, t["seed"], p, torch.float64)
    dx = tk.dx(t["dy"], w, ds, t["a"], t["seed"], p, dtype)
    dx_ref = ref.dx(f64["dy"], None if w is None else f64["w"], ds_ref, f64["a"], t["seed"], p, torch.float64)
    assert (y.dtype, db.dtype, da.dtype, dx.dtype) == (dtype, t["b"].dtype, t["a"].dtype, dtype)
    errs = {name: rel(got, want) for name, got, want in
            [("S", s, s_ref), ("y", y, y_ref), ("dS", ds, ds_ref), ("dB", db, db_ref), ("dA", da, da_ref), ("dX", dx, dx_ref)]}
    assert max(errs.values()) <= TOL[dtype], errs


@pytest.mark.parametrize("k", [64, 70], ids=["aligned8", "odd_k"])
def test_mask_matches_keep_mask_bitwise(k, device):
    """With A = I the shrink output is the masked, rescaled x itself: S = m ⊙ x / (1-p), exactly."""
    m, p = 45, 0.3
    x = torch.rand(m, k, device=device) + 0.5  # no zeros, so a dropped element is unambiguous
    seed = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64, device=device)
    cols = torch.arange(k, device=device)
    for c0 in range(0, k, 16):  # 16 columns of x per call through a 16-row identity slice of A
        a = (cols[None, :] == (c0 + torch.arange(16, device=device))[:, None]).float()
        s = tk.shrink(x, a, seed, p)[:, : min(16, k - c0)]
        want = keep_mask(seed.cpu(), p, m, k)[:, c0:c0 + 16].to(device)
        assert torch.equal(s != 0, want), f"mask differs in columns {c0}..{c0 + 15}"
    keep = (tk.shrink(x, torch.eye(k, device=device)[:16], seed, p) != 0).float().mean().item()
    assert abs(keep - (1 - p)) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m, k, r", [(45, 64, 5), (33, 72, 24)])
def test_da_hands_the_mask_to_dx_as_bits(m, k, r, dtype, device):
    """da(keep_bits=...) stores exactly the packed keep-mask (every row and column written), and
    dx reading those bits gives what dx regenerating the mask gives."""
    from lorafusion_compiler.ops.dropout_mask import new_keep_bits, pack_keep_bits

    p = 0.3
    t = make(m, k, 30, r, dtype, device, bias=False)
    ds = torch.randn(m, r, device=device)
    bits = new_keep_bits(t["x"], p, r)
    bits.fill_(0xA5)  # a pattern no correct kernel leaves behind
    da = tk.da(t["x"], ds, t["seed"], p, t["a"].dtype, keep_bits=bits)
    assert torch.equal(bits.cpu(), pack_keep_bits(keep_mask(t["seed"].cpu(), p, m, k)))
    assert torch.equal(da, tk.da(t["x"], ds, t["seed"], p, t["a"].dtype))
    dx_bits = tk.dx(t["dy"], t["w"], ds, t["a"], t["seed"], p, dtype, keep_bits=bits)
    dx_ref = ref.dx(t["dy"].double(), t["w"].double(), ds.double(), t["a"].double(), t["seed"], p, torch.float64)
    assert rel(dx_bits, dx_ref) <= TOL[dtype]
    assert torch.equal(dx_bits, tk.dx(t["dy"], t["w"], ds, t["a"], t["seed"], p, dtype))


def test_keep_bits_bad_buffers_raise(device):
    from lorafusion_compiler.ops.dropout_mask import new_keep_bits

    t = make(8, 32, 8, 4, torch.float32, device)
    ds = torch.zeros(8, 4, device=device)
    assert new_keep_bits(t["x"], 0.0, 4) is None and new_keep_bits(t["x"][:, :30], 0.1, 4) is None
    assert new_keep_bits(t["x"], 0.1, 65) is None and new_keep_bits(t["x"], 0.1, 64).shape == (8, 4)
    with pytest.raises(ValueError, match="bits exist only for p != 0"):
        tk.da(t["x"], ds, t["seed"], 0.0, torch.float32, keep_bits=torch.empty(8, 4, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match=r"contiguous uint8 \[8, 4\]"):
        tk.dx(t["dy"], t["w"], ds, t["a"], t["seed"], 0.1, torch.float32,
              keep_bits=torch.empty(8, 5, dtype=torch.uint8, device=device))


def test_deterministic_is_bitwise_reproducible(device):
    t = make(70, 64, 90, 24, torch.float32, device)
    s = tk.shrink(t["x"], t["a"], t["seed"], 0.1)
    runs = []
    for _ in range(2):
        ds, db = tk.ds_db(t["dy"], t["b"], s, 2.0, deterministic=True)
        runs.append((ds, db, tk.da(t["x"], ds, t["seed"], 0.1, torch.float32, deterministic=True)))
    for u, v in zip(*runs):
        assert torch.equal(u, v)
    ds_ref, db_ref = ref.ds_db(t["dy"].double(), t["b"].double(), s.double(), 2.0)
    assert rel(runs[0][1], db_ref) < 1e-5 and rel(runs[0][0], ds_ref) < 1e-5


def test_strided_inputs(device):
    """Transposed / sliced views are read through their strides (no hidden contiguity assumption)."""
    t = make(33, 64, 40, 8, torch.float32, device)
    x_t = t["x"].t().contiguous().t()  # column-major x
    a_t = t["a"].t().contiguous().t()
    s = tk.shrink(x_t, a_t, t["seed"], 0.25)
    s_ref = ref.shrink(t["x"].double(), t["a"].double(), t["seed"], 0.25)
    assert rel(s, s_ref) < 1e-5
    w_big = torch.randn(40, 128, device=device)[:, ::2]  # non-unit column stride
    y = tk.base_expand(t["x"], w_big, None, s, t["b"], 1.0, torch.float32)
    y_ref = ref.base_expand(t["x"].double(), w_big.double(), None, s_ref, t["b"].double(), 1.0, torch.float64)
    assert rel(y, y_ref) < 1e-5


def test_op_autograd_3d_input(device):
    """The custom op with kernels="triton", "gluon" and "gluon-gemms" (off Hopper: the same Triton kernels): 3-D x,
    grads of x, A, B against the torch kernel set."""
    from lorafusion_compiler.ops.lora_linear import lora_linear

    t = make(2 * 19, 40, 24, 8, torch.float32, device, bias=True)
    grads = {}
    for impl in ("triton", "gluon", "gluon-gemms", "torch"):
        x = t["x"].reshape(2, 19, 40).clone().requires_grad_()
        a, b = t["a"].clone().requires_grad_(), t["b"].clone().requires_grad_()
        y, _, seed, _ = lora_linear(x, t["w"], t["bias"], a, b, 2.0, 0.0, torch.float32, impl, False)
        y.backward(t["dy"].reshape(2, 19, 24))
        grads[impl] = (y, x.grad, a.grad, b.grad)
    for impl in ("triton", "gluon", "gluon-gemms"):
        for got, want in zip(grads[impl], grads["torch"]):
            assert got.shape == want.shape and rel(got, want) < 1e-5, impl


@pytest.mark.parametrize("bad", ["rank", "seed_dtype", "shape", "p", "dtype"])
def test_bad_inputs_raise(bad, device):
    t = make(8, 32, 8, 4, torch.float32, device)
    x, a, seed = t["x"], t["a"], t["seed"]
    if bad == "rank":
        with pytest.raises(ValueError, match="rank 300"):
            tk.shrink(x, torch.zeros(300, 32, device=device), seed, 0.1)
    elif bad == "seed_dtype":
        with pytest.raises(ValueError, match="int64"):
            tk.shrink(x, a, seed.float(), 0.1)
    elif bad == "shape":
        with pytest.raises(ValueError, match="lora_a has shape"):
            tk.shrink(x, a[:, :16], seed, 0.1)
    elif bad == "p":
        with pytest.raises(ValueError, match="p=1.5"):
            tk.da(x, torch.zeros(8, 4, device=device), seed, 1.5, torch.float32)
    else:
        with pytest.raises(ValueError, match="int32"):
            tk.shrink(x.int(), a, seed, 0.1)


def test_kernel_sources_and_spec_key():
    from lorafusion_compiler.codegen import KernelSpec, kernel_sources

    spec = KernelSpec(dtype="float16", adapter_dtype="float32", has_bias=True, dropout=True, needs_dx=False, rank_bucket=32)
    srcs = kernel_sources(spec)
    assert set(srcs) == {"shrink", "base_expand", "ds_db", "da"}
    for name, src in srcs.items():
        compile(src, name, "exec")
        assert f"def {name}_kernel" in src
    assert "_keep_mask" in srcs["shrink"] and "_keep_mask" not in srcs["base_expand"]
    assert "bias_ptr + offs_p" in srcs["base_expand"]
    assert spec.key == KernelSpec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__}).key
    with pytest.raises(ValueError, match="rank_bucket=24"):
        KernelSpec(rank_bucket=24)
    aligned = kernel_sources(KernelSpec(multi=True, adapters_aligned=True, dropout=True))
    plain = kernel_sources(KernelSpec(multi=True, dropout=True))
    for name in ("shrink", "base_expand", "ds_db", "dx"):  # the kernels that read adapter tiles
        assert "tl.multiple_of(" in aligned[name] and "tl.multiple_of(" not in plain[name]
    assert aligned["da"] == plain["da"]  # da reads no adapter matrix: not specialised on it
    with pytest.raises(ValueError, match="keep_bits=True needs dropout=True and aligned8=True"):
        KernelSpec(keep_bits=True, dropout=True, aligned8=False)
    bits = kernel_sources(KernelSpec(dropout=True, keep_bits=True))
    assert "_lanes_to_bits(" in bits["da"] and "_bits_to_mask(" in bits["dx"] and "_keep_mask(" not in bits["dx"].split("def dx_kernel")[1]
    assert bits["shrink"] == kernel_sources(KernelSpec(dropout=True))["shrink"]  # only da and dx depend on it
    with pytest.raises(ValueError, match="adapters_aligned=True needs multi=True"):
        KernelSpec(adapters_aligned=True)
    # the TMA-store epilogue (GPU only: the interpreter has no TMA) replaces the pointer store of the GEMMs
    tma = kernel_sources(KernelSpec(has_weight=True, tma=True, tma_store=True))
    for name in ("base_expand", "dx"):
        assert "out_ptr.store([pid_m * BLOCK_M, pid_p * BLOCK_P]" in tma[name] and "tl.store(out_ptr" not in tma[name]
    assert tma["shrink"] == kernel_sources(KernelSpec(has_weight=True))["shrink"]
    with pytest.raises(ValueError, match="tma_store=True needs tma=True"):
        KernelSpec(tma_store=True)
