"""The Gluon ds_db (codegen/gluon/ds_db.py) and its place in the "gluon" kernel set.

Any machine: which calls the set sends to it (``ds_db_applies``), the launcher's checks and grid.
On a Hopper GPU: dS and dB against a float64 reference and the Triton kernel, odd shapes, every
supported rank, fp32 and bf16 adapters."""

import pytest
import torch

from lorafusion_compiler.codegen import kernels as tk
from lorafusion_compiler.codegen.gluon import ds_db as gdd
from lorafusion_compiler.codegen.gluon import gemm_set
from lorafusion_compiler.codegen.gluon import kernel_set as gks
from lorafusion_compiler.ops import reference as ref

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon kernels run on a Hopper GPU only (no interpreter)")
BF = torch.bfloat16


def operands(m, n, r, *, device, b_dtype=torch.float32, s_dtype=torch.float32, seed=0):
    """dY [M, N] bf16, B [N, r], S [M, r] (scaled so dS and dB are O(1))."""
    g = torch.Generator().manual_seed(seed + m + n + r)
    dy = torch.randn(m, n, generator=g).to(device=device, dtype=BF)
    b = (torch.randn(n, r, generator=g) * max(n, 1) ** -0.5).to(device=device, dtype=b_dtype)
    s = (torch.randn(m, r, generator=g) * max(m, 1) ** -0.5).to(device=device, dtype=s_dtype)
    return dy, b, s


@pytest.mark.parametrize("change, applies", [
    ({}, True),
    ({"b_dtype": BF, "s_dtype": BF}, True),
    ({"b_dtype": torch.float16}, False),
    ({"r": 8}, True),
    ({"r": 32}, True),
    ({"r": 64}, False),  # cuBLAS's (dense_products)
    ({"r": 12}, False),
    ({"n": 100}, False),  # N % 8 != 0
    ({"dy_dtype": torch.float16}, False),
    ({"deterministic": True}, False),  # no atomics: the tl kernel's workspace slots
])
def test_gluon_ds_db_applies_to_bf16_dy_ranks_up_to_32_and_atomics(monkeypatch, change, applies):
    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    dy, b, s = operands(40, change.get("n", 64), change.get("r", 16), device="cpu",
                        b_dtype=change.get("b_dtype", torch.float32), s_dtype=change.get("s_dtype", torch.float32))
    dy = dy.to(change.get("dy_dtype", BF))
    assert gks.ds_db_applies(dy, b, s, deterministic=change.get("deterministic", False)) is applies


def test_the_set_sends_ds_db_to_gluon_only_where_it_applies(monkeypatch):
    from lorafusion_compiler.codegen import triton_set

    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    monkeypatch.setattr(gdd, "ds_db", lambda *a: "gluon")
    monkeypatch.setattr(triton_set, "ds_db", lambda *a, **k: "triton set")
    dy, b, s = operands(40, 64, 16, device="cpu")
    assert gks.ds_db(dy, b, s, 2.0) == "gluon"
    assert gks.ds_db(dy, b, s, 2.0, deterministic=True) == "triton set"
    assert gks.ds_db(dy.float(), b, s, 2.0) == "triton set"


def test_off_hopper_the_set_runs_the_triton_ds_db(device):
    if HOPPER:
        pytest.skip("on Hopper the set runs the Gluon kernel (compared below)")
    dy, b, s = operands(40, 64, 8, device=device)
    dy = dy.float()
    got, want = gks.ds_db(dy, b, s, 2.0), tk.ds_db(dy, b, s, 2.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("call, message", [
    (lambda dy, b, s: gdd.prepare_ds_db(dy.float(), b, s, 2.0, num_sms=132), "dy must be a row-major 2-D bfloat16"),
    (lambda dy, b, s: gdd.prepare_ds_db(dy[:, :60], b, s, 2.0, num_sms=132), r"dy must be .* N % 8 == 0"),
    (lambda dy, b, s: gdd.prepare_ds_db(dy, b[:32], s, 2.0, num_sms=132), r"lora_b must be .* \[N, r\] tensor \(N=64\)"),
    (lambda dy, b, s: gdd.prepare_ds_db(dy, b.half(), s, 2.0, num_sms=132), r"lora_b must be a row-major float32"),
    (lambda dy, b, s: gdd.prepare_ds_db(dy, torch.zeros(64, 12), s[:, :12], 2.0, num_sms=132),
     r"rank r=12 .* not supported"),
    (lambda dy, b, s: gdd.prepare_ds_db(dy, b, s[:20], 2.0, num_sms=132), r"s_act must be .* \[M, r\] = \[40, 16\]"),
    (lambda dy, b, s: gdd.prepare_ds_db(dy, b, s.t().contiguous().t(), 2.0, num_sms=132), "unit column stride"),
])
def test_launcher_errors_name_the_bad_value(call, message):
    dy, b, s = operands(40, 64, 16, device="cpu")
    with pytest.raises(ValueError, match=message):
        call(dy, b, s)


def test_grid_splits_the_columns_to_fill_the_sms():
    dy, b, s = operands(8192, 4096, 16, device="cpu")
    grid, args, constexprs, out = gdd.prepare_ds_db(dy, b, s, 2.0, num_sms=132)
    assert grid == (32, 4) and constexprs["SPLIT"] == 4 and constexprs["STAGES"] == 2  # 256-row tiles, 1 per SM
    assert out.shape == ((8192 + 4096) * 16,) and out.dtype == torch.float32 and not out.any()  # atomic targets
    assert args[3] == 16 and args[5] == 2.0  # S's row stride, the scale
    grid, *_ = gdd.prepare_ds_db(*operands(100, 4096, 16, device="cpu"), 2.0, num_sms=132)
    assert grid == (1, 32)  # never more splits than column tiles


SHAPES = [(8192, 4096, 16), (1000, 3000, 32), (777, 1000, 8), (256, 14336, 16), (130, 72, 8)]


@needs_hopper
@pytest.mark.parametrize("m, n, r", SHAPES)
@pytest.mark.parametrize("b_dtype", [torch.float32, BF])
def test_gluon_ds_db_matches_float64_and_the_triton_kernel(m, n, r, b_dtype):
    dy, b, s = operands(m, n, r, device="cuda", b_dtype=b_dtype)
    d_s, d_b = gdd.ds_db(dy, b, s, 2.0)
    assert d_s.dtype == torch.float32 and d_b.dtype == b_dtype and d_s.shape == (m, r) and d_b.shape == (n, r)
    want_s, want_b = ref.ds_db(dy.double(), b.double(), s.double(), 2.0)
    for name, got, want in (("dS", d_s, want_s), ("dB", d_b, want_b)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= 1e-2, f"{name} {m}x{n} r={r} {b_dtype}: normwise error {err:.2e}"
    tl_s, tl_b = tk.ds_db(dy, b, s, 2.0)
    assert torch.allclose(d_s, tl_s, rtol=1e-3, atol=1e-3 * tl_s.abs().max().item())
    tol = 1e-3 if b_dtype == torch.float32 else 1e-2  # bf16 dB: one rounding apart at most
    assert torch.allclose(d_b.float(), tl_b.float(), rtol=tol, atol=tol * tl_b.float().abs().max().item())


@needs_hopper
def test_the_set_runs_gluon_ds_db_with_a_bf16_s():
    dy, b, s = operands(1024, 2048, 16, device="cuda", s_dtype=BF)
    assert gks.ds_db_applies(dy, b, s)
    d_s, d_b = gks.ds_db(dy, b, s, 0.5)
    want_s, want_b = tk.ds_db(dy, b, s, 0.5)
    assert torch.allclose(d_s, want_s, rtol=1e-3, atol=1e-3 * want_s.abs().max().item())
    assert torch.allclose(d_b, want_b, rtol=1e-3, atol=1e-3 * want_b.abs().max().item())


def test_empty_operands_go_to_the_triton_kernels_and_the_gluon_launchers_reject_them(monkeypatch, device):
    """TMA has no descriptor for an empty tensor (operands on the GPU where there is one: the Triton kernels run
    there): the set routes M = 0 or N = 0 to the Triton kernels (which
    launch nothing and return zeros), and the Gluon launcher names the empty operand."""
    from lorafusion_compiler.codegen.gluon import lora_gemm
    from lorafusion_compiler.codegen.gluon import split_kernels as gsk

    monkeypatch.setattr(gks, "_hopper", lambda t: True)
    for m, n in ((0, 64), (40, 0)):
        dy, b, s = operands(m, n, 16, device=device)
        assert not gks.ds_db_applies(dy, b, s)
        d_s, d_b = gks.ds_db(dy, b, s, 2.0)
        assert d_s.shape == (m, 16) and d_b.shape == (n, 16) and not d_s.any() and not d_b.any()
    dy, b, s = operands(0, 64, 16, device=device)
    with pytest.raises(ValueError, match=r"dy.shape=\(0, 64\) is empty: the Gluon kernels take non-empty operands"):
        gdd.prepare_ds_db(dy, b, s, 2.0, num_sms=132)
    x, a, seed = dy, torch.randn(16, 64, device=device), torch.tensor(3, device=device)
    assert not gks.split_applies(x, a, rank_dim=0) and not gks.split_applies(x, s, rank_dim=1)
    assert gks.shrink(x, a, seed, 0.1).shape == (0, 16)
    d_a = gks.da(x, s, seed, 0.1, torch.float32)
    assert d_a.shape == (16, 64) and not d_a.any()
    with pytest.raises(ValueError, match=r"x.shape=\(0, 64\) is empty"):
        gsk.prepare_shrink(x, a, seed, 0.1, num_sms=132)
    w = torch.randn(32, 64, device=device).to(BF)
    assert not gemm_set.gluon_applies("base_expand", a=x, weight=w, low=s, right=b[:32], out_dtype=BF)
    assert gemm_set.base_expand(x, w, None, s, b[:32], 2.0, BF).shape == (0, 32)
    with pytest.raises(ValueError, match=r"x.shape=\(0, 64\) is empty"):
        lora_gemm.prepare_base_expand(x, w, None, s, b[:32], 2.0, BF, num_sms=132)
