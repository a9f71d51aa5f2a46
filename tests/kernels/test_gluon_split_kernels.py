"""The Gluon shrink and dA (codegen/gluon/split_kernels.py) and their place in the "gluon" kernel set.

Any machine: which calls the set sends to them (``split_applies``), the launchers' checks and grids.
On a Hopper GPU: both against a float64 reference and the Triton kernels, the keep bits dA stores
against ``pack_keep_bits(keep_mask(...))``, odd shapes, every supported rank, p = 0 and p > 0."""

import pytest
import torch

from lorafusion_compiler.codegen import kernels as tk
from lorafusion_compiler.codegen.gluon import kernel_set as gks
from lorafusion_compiler.codegen.gluon import split_kernels as gsk
from lorafusion_compiler.ops import reference as ref
from lorafusion_compiler.ops.dropout_mask import keep_mask, new_keep_bits, pack_keep_bits

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon kernels run on a Hopper GPU only (no interpreter)")
BF = torch.bfloat16


def operands(m, k, r, *, device, low_dtype=torch.float32, seed=0):
    """x [M, K] bf16, dS [M, r], A [r, K] (scaled so S and dA are O(1)), seed."""
    g = torch.Generator().manual_seed(seed + m + k + r)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=BF)
    ds = torch.randn(m, r, generator=g).to(device=device, dtype=low_dtype)
    a = (torch.randn(r, k, generator=g) * k ** -0.5).to(device=device, dtype=low_dtype)
    return x, ds, a, torch.tensor(1234 + seed, device=device)


@pytest.mark.parametrize("change, applies", [
    ({}, True),
    ({"low_dtype": BF}, True),
    ({"low_dtype": torch.float16}, False),
    ({"r": 8}, True),
    ({"r": 32}, True),
    ({"r": 64}, True),
    ({"r": 128}, False),
    ({"r": 12}, False),
    ({"k": 100}, False),  # K % 8 != 0
    ({"x_dtype": torch.float16}, False),
])
def test_split_kernels_apply_to_bf16_x_and_ranks_up_to_64(monkeypatch, change, applies):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    x, ds, a, _ = operands(40, change.get("k", 64), change.get("r", 16), device="cpu",
                           low_dtype=change.get("low_dtype", torch.float32))
    x = x.to(change.get("x_dtype", BF))
    assert gks.split_applies(x, a, rank_dim=0) is applies
    assert gks.split_applies(x, ds, rank_dim=1) is applies


@pytest.mark.parametrize("r, p, expected", [(16, 0.0, "gluon"), (32, 0.0, "cublas"), (32, 0.1, "gluon"), (64, 0.0, "cublas")])
def test_without_dropout_from_rank_32_cublas_takes_shrink_and_da_before_gluon(monkeypatch, r, p, expected):
    from lorafusion_compiler.codegen import dense_products
    from lorafusion_compiler.codegen.gluon import split_kernels

    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    # as dense_products.applies decides on a GPU (it takes CUDA tensors only)
    monkeypatch.setattr(dense_products, "applies",
                        lambda kernel, *, activations, rank, p=0.0: p == 0.0 and rank >= dense_products.MIN_RANK[kernel])
    monkeypatch.setattr(dense_products, "shrink", lambda *a: "cublas")
    monkeypatch.setattr(dense_products, "da", lambda *a: "cublas")
    monkeypatch.setattr(split_kernels, "shrink", lambda *a, **k: "gluon")
    monkeypatch.setattr(split_kernels, "da", lambda *a, **k: "gluon")
    x, ds, a, seed = operands(40, 64, r, device="cpu")
    assert gks.shrink(x, a, seed, p) == expected
    assert gks.da(x, ds, seed, p, torch.float32) == expected


def test_the_deterministic_da_is_the_triton_one(monkeypatch):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    x, ds, _a, _ = operands(40, 64, 16, device="cpu")
    assert gks.split_applies(x, ds, rank_dim=1) and not gks.split_applies(x, ds, rank_dim=1, deterministic=True)


def test_off_hopper_the_set_runs_the_triton_kernels(device):
    if HOPPER:
        pytest.skip("on Hopper the set runs the Gluon kernels (compared below)")
    x, ds, a, seed = operands(40, 64, 8, device=device)
    x = x.float()
    assert torch.equal(gks.da(x, ds, seed, 0.25, torch.float32), tk.da(x, ds, seed, 0.25, torch.float32))
    assert torch.equal(gks.shrink(x, a, seed, 0.25), tk.shrink(x, a, seed, 0.25))


@pytest.mark.parametrize("change, saves", [
    ({}, True),
    ({"p": 0.0}, False),
    ({"k": 200}, False),  # K % 128 != 0: the Gluon dA could not read the bits by TMA
    ({"r": 64}, True),
    ({"r": 128}, False),
    ({"deterministic": True}, False),  # the deterministic dA is the tl one, which regenerates the mask
    ({"x_dtype": torch.float16}, False),
    ({"low_dtype": BF}, True),
])
def test_the_forward_saves_keep_bits_where_the_gluon_da_reads_them(monkeypatch, change, saves):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    x, _ds, a, _ = operands(40, change.get("k", 256), change.get("r", 16), device="cpu",
                            low_dtype=change.get("low_dtype", torch.float32))
    x = x.to(change.get("x_dtype", BF))
    assert gks.saves_keep_bits(x, a, change.get("p", 0.1), deterministic=change.get("deterministic", False)) is saves


def test_off_hopper_the_set_still_stores_the_keep_bits_it_is_given(device):
    if HOPPER:
        pytest.skip("on Hopper the Gluon shrink stores them (compared below)")
    x, _ds, a, seed = operands(40, 64, 8, device=device)
    bits = torch.full((40, 8), 0xA5, dtype=torch.uint8, device=device)
    s = gks.shrink(x.float(), a, seed, 0.25, keep_bits=bits)
    assert torch.equal(bits.cpu(), pack_keep_bits(keep_mask(seed.cpu(), 0.25, 40, 64)))
    assert torch.equal(s, tk.shrink(x.float(), a, seed, 0.25))


def test_launchers_take_keep_bits_to_store_or_to_read():
    x, ds, a, seed = operands(64, 256, 16, device="cpu")
    bits = torch.zeros(64, 32, dtype=torch.uint8)
    _grid, _args, constexprs, _out = gsk.prepare_shrink(x, a, seed, 0.1, keep_bits=bits, num_sms=132)
    assert constexprs["BITS_OUT"] and not constexprs["BITS_IN"]
    _grid, _args, constexprs, _out = gsk.prepare_da(x, ds, seed, 0.1, stored_bits=bits, num_sms=132)
    assert constexprs["BITS_IN"] and not constexprs["BITS_OUT"]
    x200, ds200, _a, _seed = operands(64, 200, 16, device="cpu")  # rows of 25 bytes: no TMA, the mask regenerated
    stored = torch.zeros(64, 25, dtype=torch.uint8)
    _grid, _args, constexprs, _out = gsk.prepare_da(x200, ds200, seed, 0.1, stored_bits=stored, num_sms=132)
    assert not constexprs["BITS_IN"] and not constexprs["BITS_OUT"] and constexprs["DROPOUT"]
    with pytest.raises(ValueError, match="keep_bits and stored_bits given together"):
        gsk.prepare_da(x, ds, seed, 0.1, keep_bits=bits, stored_bits=bits.clone(), num_sms=132)
    with pytest.raises(ValueError, match=r"keep_bits must be a contiguous uint8 \[64, 32\] tensor"):
        gsk.prepare_shrink(x, a, seed, 0.1, keep_bits=bits[:, :16], num_sms=132)


@pytest.mark.parametrize("call, message", [
    (lambda x, ds, a, s: gsk.prepare_da(x.float(), ds, s, 0.1, num_sms=132), "x must be a row-major 2-D bfloat16"),
    (lambda x, ds, a, s: gsk.prepare_da(x, ds[:, :12].contiguous(), s, 0.1, num_sms=132), r"rank r=12 .* not supported"),
    (lambda x, ds, a, s: gsk.prepare_da(x, ds[:20], s, 0.1, num_sms=132), r"ds must be .* \[M, r\] tensor \(M=40"),
    (lambda x, ds, a, s: gsk.prepare_shrink(x, a[:, :32].contiguous(), s, 0.1, num_sms=132), r"lora_a must be .* \[r, K\]"),
    (lambda x, ds, a, s: gsk.prepare_shrink(x, a, s.int(), 0.1, num_sms=132), "seed must be a one-element int64"),
    (lambda x, ds, a, s: gsk.prepare_shrink(x, a, s, 1.0, num_sms=132), "p=1.0"),
    (lambda x, ds, a, s: gsk.prepare_da(x, ds, s, 0.0, keep_bits=torch.zeros(40, 8, dtype=torch.uint8), num_sms=132),
     r"keep_bits given with p=0.0, K=64: bits exist only for p != 0"),
    (lambda x, ds, a, s: gsk.prepare_da(x, ds, s, 0.1, keep_bits=torch.zeros(40, 7, dtype=torch.uint8), num_sms=132),
     r"keep_bits must be a contiguous uint8 \[40, 8\] tensor"),
])
def test_launcher_errors_name_the_bad_value(call, message):
    x, ds, a, seed = operands(40, 64, 16, device="cpu")
    with pytest.raises(ValueError, match=message):
        call(x, ds, a, seed)


def test_grids_split_the_reduction_to_fill_the_sms():
    x, ds, a, seed = operands(8192, 4096, 16, device="cpu")
    grid, _args, constexprs, out = gsk.prepare_da(x, ds, seed, 0.1, num_sms=132)
    assert grid == (32, 8) and constexprs["SPLIT"] == 8 and constexprs["DA"]
    assert not constexprs["BITS_OUT"] and not constexprs["BITS_IN"]
    assert out.shape == (16, 4096) and out.dtype == torch.float32 and not out.any()  # atomics add into zeros
    grid, _args, constexprs, out = gsk.prepare_shrink(x, a, seed, 0.1, num_sms=132)
    assert grid == (128, 2) and not constexprs["DA"] and constexprs["ATOMIC"]
    assert out.shape == (1, 8192, 16) and out.dtype == torch.float32 and not out.any()  # the splits add into zeros
    grid, _args, constexprs, out = gsk.prepare_shrink(x, a, seed, 0.1, deterministic=True, num_sms=132)
    assert grid == (128, 2) and not constexprs["ATOMIC"] and out.shape == (2, 8192, 16)  # one partial sum per split
    one_tile_x, _ds, one_tile_a, _seed = operands(8192, 128, 16, device="cpu")  # K = one column tile
    _grid, _args, constexprs, out = gsk.prepare_shrink(one_tile_x, one_tile_a, seed, 0.1, num_sms=132)
    assert constexprs["SPLIT"] == 1 and not constexprs["ATOMIC"] and out.shape == (1, 8192, 16)  # nothing to add
    grid, *_ = gsk.prepare_da(*operands(100, 4096, 16, device="cpu")[:2], seed, 0.1, num_sms=132)
    assert grid == (32, 2)  # never more splits than row tiles


SHAPES = [(8192, 4096, 16), (1000, 4096, 16), (512, 1024, 64), (777, 1000, 8), (256, 14336, 32)]


@needs_hopper
@pytest.mark.parametrize("m, k, r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gluon_da_matches_float64_and_stores_the_keep_bits(m, k, r, p):
    x, ds, _a, seed = operands(m, k, r, device="cuda")
    bits = new_keep_bits(x, p, r)
    if bits is not None:
        bits.fill_(0xA5)  # a pattern no correct kernel leaves behind
    got = gsk.da(x, ds, seed, p, torch.float32, keep_bits=bits)
    want = ref.da(x.double(), ds.double(), seed, p, torch.float64)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err <= 1e-2, f"dA {m}x{k} r={r} p={p}: normwise error {err:.2e}"
    if bits is not None:
        assert torch.equal(bits.cpu(), pack_keep_bits(keep_mask(seed.cpu(), p, m, k)))
    tl_da = tk.da(x, ds, seed, p, torch.float32)
    assert torch.allclose(got, tl_da, rtol=1e-3, atol=1e-3 * tl_da.abs().max().item())


@needs_hopper
@pytest.mark.parametrize("m, k, r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gluon_shrink_matches_float64_and_the_triton_shrink(m, k, r, p):
    x, _ds, a, seed = operands(m, k, r, device="cuda")
    got = gsk.shrink(x, a, seed, p)
    want = ref.shrink(x.double(), a.double(), seed, p)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert got.dtype == torch.float32 and err <= 1e-2, f"S {m}x{k} r={r} p={p}: normwise error {err:.2e}"
    tl_s = tk.shrink(x, a, seed, p)
    assert torch.allclose(got, tl_s, rtol=1e-3, atol=1e-3 * tl_s.abs().max().item())
    fixed = gsk.shrink(x, a, seed, p, deterministic=True)
    assert torch.allclose(got, fixed, rtol=1e-5, atol=1e-5 * fixed.abs().max().item())  # atomics vs fixed order
    assert torch.equal(fixed, gsk.shrink(x, a, seed, p, deterministic=True))  # partial sums in a fixed order


@needs_hopper
def test_the_set_casts_da_to_the_adapters_dtype_and_takes_bf16_low_rank_operands():
    x, ds, a, seed = operands(1024, 2048, 16, device="cuda", low_dtype=BF)
    assert gks.split_applies(x, ds, rank_dim=1) and gks.split_applies(x, a, rank_dim=0)
    got = gks.da(x, ds, seed, 0.1, BF)
    want = tk.da(x, ds, seed, 0.1, BF)
    assert got.dtype == BF and torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.float().abs().max().item())
    s = gks.shrink(x, a, seed, 0.1)
    s_want = tk.shrink(x, a, seed, 0.1)
    assert s.dtype == torch.float32 and torch.allclose(s, s_want, rtol=1e-2, atol=1e-2 * s_want.float().abs().max().item())


@needs_hopper
@pytest.mark.parametrize("m, k, r", SHAPES)
def test_gluon_shrink_stores_the_keep_bits_and_da_reads_them(m, k, r):
    """shrink's keep bits equal the mask's; S is unchanged by storing them; dA reading them matches float64
    and the dA that regenerates the mask; bits that keep everything give dA(p=0)/(1-p) where dA reads them
    (K % 128 == 0), so the bits, not the seed, were used."""
    p = 0.1
    x, ds, a, seed = operands(m, k, r, device="cuda")
    bits = new_keep_bits(x, p, r)
    bits.fill_(0xA5)  # a pattern no correct kernel leaves behind
    s = gsk.shrink(x, a, seed, p, keep_bits=bits)
    assert torch.equal(bits.cpu(), pack_keep_bits(keep_mask(seed.cpu(), p, m, k)))
    s_plain = gsk.shrink(x, a, seed, p)
    assert torch.allclose(s, s_plain, rtol=1e-5, atol=1e-5 * s_plain.abs().max().item())  # atomics' order only
    got = gsk.da(x, ds, seed, p, torch.float32, stored_bits=bits)
    want = ref.da(x.double(), ds.double(), seed, p, torch.float64)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err <= 1e-2, f"dA from stored bits {m}x{k} r={r}: normwise error {err:.2e}"
    regenerated = gsk.da(x, ds, seed, p, torch.float32)
    assert torch.allclose(got, regenerated, rtol=1e-5, atol=1e-5 * regenerated.abs().max().item())
    if gsk.bits_by_tma(bits):
        keep_all = gsk.da(x, ds, seed, p, torch.float32, stored_bits=torch.full_like(bits, 0xFF))
        no_dropout = gsk.da(x, ds, seed, 0.0, torch.float32) / (1 - p)
        assert torch.allclose(keep_all, no_dropout, rtol=1e-4, atol=1e-4 * no_dropout.abs().max().item())


@needs_hopper
def test_the_op_saves_the_shrinks_keep_bits_on_hopper():
    from lorafusion_compiler.ops.lora_linear import lora_linear

    x, _ds, a, _seed = operands(512, 1024, 16, device="cuda")
    w = torch.randn(256, 1024, device="cuda", dtype=BF) / 32
    b = torch.randn(256, 16, device="cuda")
    _y, _s, seed, bits = lora_linear(x, w, None, a, b, 2.0, 0.1, BF, "gluon", False)
    assert bits.shape == (512, 128) and torch.equal(bits.cpu(), pack_keep_bits(keep_mask(seed.cpu(), 0.1, 512, 1024)))
    _y, _s, _seed, bits = lora_linear(x, w, None, a, b, 2.0, 0.1, BF, "triton", False)
    assert bits.shape == (0, 0)  # the triton set regenerates the mask in dA


@needs_hopper
def test_compiled_bf16_llama_with_saved_keep_bits_matches_eager(monkeypatch):
    """The tiny LLaMa (hidden 128: K % 128 == 0 at every site) in bf16, compiled with the Gluon set at p = 0.1,
    against the eager model drawing the same masks (``SeededDropout``): loss and every adapter gradient; the
    set was asked for keep bits and said yes (at trace time, with fake tensors, and at run time)."""
    from helpers import LossOf, compare_compiled_to_eager

    from lorafusion_compiler.product.tiny_llama import TinyLlamaConfig, add_lora, build_tiny_llama

    answers = []
    real = gks.saves_keep_bits
    monkeypatch.setattr(gks, "saves_keep_bits", lambda *a, **k: answers.append(real(*a, **k)) or answers[-1])
    config = TinyLlamaConfig(hidden_size=128, intermediate_size=256)
    model = add_lora(build_tiny_llama(config, seed=0, dtype=BF).to("cuda"), rank=16, alpha=32, dropout=0.1)
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    compare_compiled_to_eager(LossOf(model), ids, inner_backend="inductor", tol=2e-2, options={"kernels": "gluon"})
    assert answers and all(answers)
