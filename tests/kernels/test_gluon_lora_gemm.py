"""The Gluon fused GEMMs (codegen/gluon/lora_gemm.py) and the "gluon-gemms" kernel set that runs them.

Any machine: which calls the kernel set sends to Gluon (``gluon_applies``), the launchers' argument
checks, that off Hopper the set is exactly the "triton" one, and that the "gluon" set keeps the Triton GEMMs. On a Hopper GPU: base_expand and
dx (p = 0 and reading keep bits) against a float64 reference, bitwise against the Triton kernels,
and the kernel set inside the op's forward and backward."""

import pytest
import torch

from lorafusion_compiler.codegen import kernels as tk
from lorafusion_compiler.codegen.gluon import gemm_set as gks
from lorafusion_compiler.codegen.gluon import kernel_set as gluon_set
from lorafusion_compiler.codegen.gluon import lora_gemm
from lorafusion_compiler.ops import get_kernel_set, lora_linear
from lorafusion_compiler.ops.dropout_mask import new_keep_bits, unpack_keep_bits

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon kernels run on a Hopper GPU only (no interpreter)")
BF = torch.bfloat16


def operands(m, k, n, r, *, device, dtype=BF, adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, s=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dt)
    # the low-rank term is as large as the main one, so a wrong mask or scale cannot hide in the tolerance
    return dict(x=rnd(m, k), w=rnd(n, k, s=k ** -0.5), bias=rnd(n), s=rnd(m, r, dt=adapter_dtype),
                b=rnd(n, r, s=r ** -0.5, dt=adapter_dtype), dy=rnd(m, n), ds=rnd(m, r, dt=torch.float32),
                a=rnd(r, k, s=r ** -0.5, dt=adapter_dtype), seed=torch.tensor(7, device=device))


def test_the_kernel_set_is_registered_with_the_triton_multi_adapter_launchers():
    ks = get_kernel_set("gluon-gemms")
    assert ks is gks and all(callable(getattr(ks, f)) for f in ("shrink", "base_expand", "ds_db", "da", "dx"))
    assert ks.multi_forward is tk.multi_forward and ks.multi_backward is tk.multi_backward
    # everything but the two fused GEMMs is the "gluon" set's
    for name in ("shrink", "ds_db", "da", "saves_keep_bits"):
        assert getattr(ks, name) is getattr(gluon_set, name), name


def test_the_gluon_set_runs_the_triton_sets_fused_gemms():
    """At the power cap the tl GEMMs take less energy than these (BENCHMARKS.md, twenty-second session)."""
    ks = get_kernel_set("gluon")
    assert ks is gluon_set and ks.base_expand is tk.base_expand and ks.dx is tk.dx


@pytest.mark.parametrize("change, applies", [
    ({}, True),
    ({"adapter_dtype": torch.float32}, True),  # PEFT's default adapters: rounded to bf16 first
    ({"adapter_dtype": torch.float16}, False),
    ({"dtype": torch.float16}, False),
    ({"r": 128}, False),
    ({"m": 1004}, False),
    ({"weight": None}, False),
    ({"out_dtype": torch.float32}, False),
])
def test_gluon_applies_to_bf16_ranks_up_to_64_with_a_weight(monkeypatch, change, applies):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    m, r = change.get("m", 64), change.get("r", 16)
    t = operands(m, 32, 48, r, device="cpu", dtype=change.get("dtype", BF), adapter_dtype=change.get("adapter_dtype"))
    weight = change.get("weight", t["w"])
    out_dtype = change.get("out_dtype", BF)
    assert gks.gluon_applies("base_expand", a=t["x"], weight=weight, low=t["s"], right=t["b"], out_dtype=out_dtype) is applies
    assert gks.gluon_applies("dx", a=t["dy"], weight=weight, low=t["ds"], right=t["a"], out_dtype=out_dtype) is applies


@pytest.mark.parametrize("bias, applies", [
    (None, True),
    (torch.zeros(48, dtype=BF), True),
    (torch.zeros(48), False),  # fp32: the epilogue adds bf16 (the Triton kernels take it)
    (torch.zeros(40, dtype=BF), False),
    (torch.zeros(96, dtype=BF)[::2], False),  # strided
])
def test_gluon_base_expand_takes_a_contiguous_bf16_bias_only(monkeypatch, bias, applies):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    t = operands(64, 32, 48, 16, device="cpu")
    assert gks.gluon_applies("base_expand", a=t["x"], weight=t["w"], low=t["s"], right=t["b"], out_dtype=BF,
                             bias=bias) is applies
    assert lora_gemm.bias_ok(bias, 48) is applies


@pytest.mark.parametrize("r, bits, in_kernel", [(8, False, True), (16, False, True), (16, True, True), (32, False, False),
                                             (64, False, False), (64, True, False)])
def test_an_fp32_low_rank_operand_is_rounded_in_the_kernel_where_that_costs_no_ring_stage(r, bits, in_kernel):
    assert lora_gemm.fp32_low_is_free(r, bits) is in_kernel
    low = torch.randn(256, r)
    _, args, _, _ = lora_gemm._launch_args(torch.empty(256, 64, dtype=BF), torch.empty(128, 64, dtype=BF), low,
                                           torch.empty(128, r, dtype=BF), True, torch.empty(256, 128, dtype=BF), None,
                                           torch.zeros(256, 16, dtype=torch.uint8) if bits else None, 1.0, 256, 128, 64,
                                           num_sms=132)
    assert args[2].base.dtype == (torch.float32 if in_kernel else BF)  # the S / dS descriptor's tensor


def test_the_set_hands_fp32_adapters_to_lora_gemm_uncast(monkeypatch):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    seen = {}

    def fake_base_expand(x, weight, bias, s_act, lora_b, scale, out_dtype):
        seen.update(s=s_act.dtype, b=lora_b.dtype)
        return x.new_empty(x.shape[0], weight.shape[0])

    def fake_dx(dy, weight, ds, lora_a, p, out_dtype, *, keep_bits=None):
        seen.update(ds=ds.dtype, a=lora_a.dtype)
        return dy.new_empty(dy.shape[0], weight.shape[1])
    monkeypatch.setattr(lora_gemm, "base_expand", fake_base_expand)
    monkeypatch.setattr(lora_gemm, "dx", fake_dx)
    t = operands(64, 32, 48, 16, device="cpu", adapter_dtype=torch.float32)
    gks.base_expand(t["x"], t["w"], None, t["s"], t["b"], 2.0, BF)
    gks.dx(t["dy"], t["w"], t["ds"], t["a"], t["seed"], 0.0, BF)
    assert seen == {"s": torch.float32, "b": torch.float32, "ds": torch.float32, "a": torch.float32}


@pytest.mark.parametrize("r, b_kmajor, transposed, in_kernel", [(8, True, False, True), (32, True, False, True),
                                                               (32, False, False, True), (64, True, False, False),
                                                               (64, False, False, False), (16, True, True, False)])
def test_an_fp32_right_operand_is_rounded_in_the_kernel_up_to_rank_32(r, b_kmajor, transposed, in_kernel):
    n = 128
    right = torch.randn(n, r) if b_kmajor else torch.randn(r, n)
    if transposed:  # the same values, column-major
        right = right.t().contiguous().t()
    _, args, constexprs, _ = lora_gemm._launch_args(
        torch.empty(256, 64, dtype=BF), torch.empty(n, 64, dtype=BF) if b_kmajor else torch.empty(64, n, dtype=BF),
        torch.randn(256, r), right, b_kmajor, torch.empty(256, n, dtype=BF), None, None, 1.0, 256, n, 64, num_sms=132)
    assert constexprs["R_FP32"] is in_kernel
    r_tensor, stride_r, rank = args[9:12]
    assert rank == r and stride_r == r_tensor.stride(0) and r_tensor.stride(1) == 1
    if in_kernel:
        assert r_tensor is right and args[3] is args[2]  # the R descriptor is a placeholder (the S one)
    else:
        assert r_tensor.dtype == BF and torch.equal(r_tensor, right.to(BF)) and args[3].base is r_tensor


def test_gluon_dx_needs_keep_bits_exactly_when_p_is_positive(monkeypatch):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    t = operands(64, 32, 48, 16, device="cpu")
    bits = torch.zeros(64, 4, dtype=torch.uint8)
    common = dict(a=t["dy"], weight=t["w"], low=t["ds"], right=t["a"], out_dtype=BF)
    assert gks.gluon_applies("dx", **common, p=0.1, keep_bits=bits)
    assert not gks.gluon_applies("dx", **common, p=0.1)  # the tl dx regenerates the mask from the seed
    assert not gks.gluon_applies("dx", **common, p=0.0, keep_bits=bits)


@pytest.mark.parametrize("r, applies", [(16, True), (32, True), (64, False)])
def test_gluon_dx_with_keep_bits_needs_a_deep_ring(monkeypatch, r, applies):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    t = operands(64, 1024, 48, r, device="cpu")
    bits = torch.zeros(64, 1024 // 8, dtype=torch.uint8)  # 128-byte rows: through TMA, into shared memory
    assert lora_gemm.deep_ring(r, bits_tma=True) is applies
    assert gks.gluon_applies("dx", a=t["dy"], weight=t["w"], low=t["ds"], right=t["a"], out_dtype=BF, p=0.1,
                             keep_bits=bits) is applies
    assert gks.gluon_applies("dx", a=t["dy"], weight=t["w"], low=t["ds"], right=t["a"], out_dtype=BF)  # p = 0


def test_off_hopper_the_set_equals_the_triton_set(device):
    if HOPPER:
        pytest.skip("on Hopper the set runs Gluon (compared below)")
    t = operands(40, 64, 24, 8, device=device, dtype=torch.float32)
    y = gks.base_expand(t["x"], t["w"], t["bias"], t["s"], t["b"], 2.0, torch.float32)
    assert torch.equal(y, tk.base_expand(t["x"], t["w"], t["bias"], t["s"], t["b"], 2.0, torch.float32))
    dx = gks.dx(t["dy"], t["w"], t["ds"], t["a"], t["seed"], 0.25, torch.float32)
    assert torch.equal(dx, tk.dx(t["dy"], t["w"], t["ds"], t["a"], t["seed"], 0.25, torch.float32))


@pytest.mark.parametrize("call, message", [
    (lambda t: lora_gemm.base_expand(t["x"], t["w"], None, t["s"][:, :12], t["b"][:, :12], 2.0, BF), r"rank r=12 \(from s_act"),
    (lambda t: lora_gemm.base_expand(t["x"][:, :20], t["w"][:, :20], None, t["s"], t["b"], 2.0, BF), "must be a multiple of 8"),
    (lambda t: lora_gemm.base_expand(t["x"], t["w"], None, t["s"].half(), t["b"], 2.0, BF),
     r"s_act must be a float32 or bfloat16 \[M=64, r\] tensor, got torch.float16"),
    (lambda t: lora_gemm.base_expand(t["x"], t["w"], None, t["s"], t["b"], 2.0, torch.float16), "out_dtype=torch.float16 is not supported"),
    (lambda t: lora_gemm.base_expand(t["x"], t["w"], None, t["s"], t["b"][:40], 2.0, BF), r"lora_b.shape=\(40, 16\) must be \[N=48, r=16\]"),
    (lambda t: lora_gemm.dx(t["dy"], t["w"], t["ds"], t["a"], 0.1, BF), "the Gluon dx reads the mask from da's keep bits"),
    (lambda t: lora_gemm.dx(t["dy"], t["w"], t["ds"], t["a"], 1.0, BF), r"p=1.0 is outside \[0, 1\)"),
    (lambda t: lora_gemm.dx(t["dy"], t["w"], t["ds"], t["a"], 0.1, BF, keep_bits=torch.zeros(64, 3, dtype=torch.uint8)),
     r"keep_bits must be a contiguous uint8 \[64, 4\] tensor"),
])
def test_launcher_errors_name_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call(operands(64, 32, 48, 16, device="cpu"))


def _reference(t, p, bits):
    mask = unpack_keep_bits(bits).double() if bits is not None else 1.0
    f = {key: v.double() for key, v in t.items() if key != "seed"}
    y = f["x"] @ f["w"].t() + f["bias"] + 2.0 * (f["s"] @ f["b"].t())
    dx = f["dy"] @ f["w"] + mask * (f["ds"].to(BF).double() @ f["a"]) / (1 - p)
    return y, dx


@needs_hopper
@pytest.mark.parametrize("m, k, n, r", [(1000, 4096, 3000, 16), (264, 136, 520, 8), (512, 1024, 768, 64), (8192, 4096, 4096, 16)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gluon_gemms_match_float64_and_the_triton_kernels_bitwise(m, k, n, r, p):
    t = operands(m, k, n, r, device="cuda", seed=m + k + n + r)
    bits = new_keep_bits(t["x"], p, r) if p else None
    if bits is not None:
        tk.da(t["x"], t["ds"], t["seed"], p, BF, keep_bits=bits)
    y = lora_gemm.base_expand(t["x"], t["w"], t["bias"], t["s"], t["b"], 2.0, BF)
    dx = lora_gemm.dx(t["dy"], t["w"], t["ds"], t["a"], p, BF, keep_bits=bits)
    y_ref, dx_ref = _reference(t, p, bits)
    for name, got, want in (("y", y, y_ref), ("dX", dx, dx_ref)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= 1e-2, f"{name} {m}x{k}x{n} r={r} p={p}: max error / max |ref| = {err:.2e}"
    assert torch.equal(y, tk.base_expand(t["x"], t["w"], t["bias"], t["s"], t["b"], 2.0, BF))
    assert torch.equal(dx, tk.dx(t["dy"], t["w"], t["ds"], t["a"], t["seed"], p, BF, keep_bits=bits))


@needs_hopper
@pytest.mark.parametrize("r", [8, 32, 64])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fp32_low_rank_operands_are_rounded_as_a_cast_would(r, p):
    """S/dS and B/A in fp32 (rounded in the kernel where that is free, else cast first) give the bf16 results
    bitwise; odd N and K exercise the masked edges of the in-kernel rounding of B and A."""
    t = operands(520, 1032, 776, r, device="cuda", adapter_dtype=torch.float32, seed=r)
    bits = new_keep_bits(t["x"], p, r) if p else None
    if bits is not None:
        tk.da(t["x"], t["ds"], t["seed"], p, torch.float32, keep_bits=bits)
    y = lora_gemm.base_expand(t["x"], t["w"], t["bias"], t["s"], t["b"], 2.0, BF)
    assert torch.equal(y, lora_gemm.base_expand(t["x"], t["w"], t["bias"], t["s"].to(BF), t["b"].to(BF), 2.0, BF))
    dx = lora_gemm.dx(t["dy"], t["w"], t["ds"], t["a"], p, BF, keep_bits=bits)
    assert torch.equal(dx, lora_gemm.dx(t["dy"], t["w"], t["ds"].to(BF), t["a"].to(BF), p, BF, keep_bits=bits))


@needs_hopper
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_set_with_fp32_adapters_equals_the_triton_kernels_bitwise(p):
    t = operands(1024, 2048, 1536, 16, device="cuda", adapter_dtype=torch.float32)
    bits = new_keep_bits(t["x"], p, 16) if p else None
    if bits is not None:
        tk.da(t["x"], t["ds"], t["seed"], p, torch.float32, keep_bits=bits)
    assert gks.gluon_applies("base_expand", a=t["x"], weight=t["w"], low=t["s"], right=t["b"], out_dtype=BF)
    y = gks.base_expand(t["x"], t["w"], t["bias"], t["s"], t["b"], 2.0, BF)
    assert torch.equal(y, tk.base_expand(t["x"], t["w"], t["bias"], t["s"], t["b"], 2.0, BF))
    dx = gks.dx(t["dy"], t["w"], t["ds"], t["a"], t["seed"], p, BF, keep_bits=bits)
    assert torch.equal(dx, tk.dx(t["dy"], t["w"], t["ds"], t["a"], t["seed"], p, BF, keep_bits=bits))


@needs_hopper
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_op_with_the_gluon_gemms_set_matches_the_triton_set(p):
    t = operands(2048, 1024, 1536, 16, device="cuda")
    grads = {}
    for kernels in ("triton", "gluon-gemms"):
        torch.manual_seed(5)  # the op draws its dropout seed from the RNG: the same mask for both sets
        x, a, b = (t[key].clone().requires_grad_() for key in ("x", "a", "b"))
        y = lora_linear(x, t["w"], t["bias"], a, b, 2.0, p, BF, kernels, False)[0]
        y.backward(t["dy"])
        grads[kernels] = (y, x.grad, a.grad, b.grad)
    for name, got, want in zip(("y", "dX", "dA", "dB"), grads["gluon-gemms"], grads["triton"]):
        assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.float().abs().max().item()), name
