"""The mask-free low-rank products as cuBLAS matmuls (codegen/dense_products.py) and the "triton" set's
routing to them (codegen/triton_set.py).

Any machine: off a GPU the set is the generated kernels everywhere (what the interpreter tests run).
On a GPU: which calls go to cuBLAS, each product against a float64 reference (bf16 operands: a
normwise error of a few 1e-3; a missing scale or a transposed operand gives errors of order 1), and
the op with the "triton" set at r=128 against the torch reference set, output and every gradient."""

import pytest
import torch
from helpers import rel_error as rel

from lorafusion_compiler.codegen import dense_products as dense
from lorafusion_compiler.codegen import kernels as tk
from lorafusion_compiler.codegen import triton_set
from lorafusion_compiler.ops import get_kernel_set, lora_linear

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="the cuBLAS route is for CUDA tensors")
BF = torch.bfloat16


def test_the_triton_set_is_the_generated_kernels_plus_the_dense_route():
    ks = get_kernel_set("triton")
    assert ks is triton_set
    assert ks.base_expand is tk.base_expand and ks.dx is tk.dx
    assert ks.multi_forward is tk.multi_forward and ks.multi_backward is tk.multi_backward


@pytest.mark.parametrize("kernel", ["shrink", "da", "ds_db"])
def test_off_a_gpu_nothing_goes_to_cublas(kernel):
    x = torch.randn(64, 32, dtype=BF)
    assert not dense.applies(kernel, activations=x, rank=256)


def test_an_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="kernel='dx' is not one of"):
        dense.applies("dx", activations=torch.randn(2, 2), rank=64)


@needs_gpu
@pytest.mark.parametrize("kernel, rank, p, dtype, applies", [
    ("shrink", 32, 0.0, BF, True), ("shrink", 16, 0.0, BF, False), ("shrink", 128, 0.1, BF, False),
    ("da", 32, 0.0, torch.float16, True), ("da", 64, 0.0, torch.float32, False),
    ("ds_db", 32, 0.0, BF, False), ("ds_db", 64, 0.0, BF, True),
])
def test_the_route_takes_mask_free_half_precision_calls_from_the_measured_ranks(kernel, rank, p, dtype, applies):
    x = torch.randn(64, 32, device="cuda", dtype=dtype)
    assert dense.applies(kernel, activations=x, rank=rank, p=p) is applies


@needs_gpu
@pytest.mark.parametrize("m, k, n, r", [(1000, 4000, 3000, 40), (8192, 4096, 4096, 128), (264, 136, 520, 64)])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, BF], ids=["fp32-adapters", "bf16-adapters"])
def test_each_product_matches_float64(m, k, n, r, adapter_dtype):
    g = torch.Generator().manual_seed(m + r)

    def rnd(*shape, s=1.0, dt=BF):
        return (torch.randn(*shape, generator=g) * s).to(device="cuda", dtype=dt)
    x, dy = rnd(m, k), rnd(m, n)
    a, b = rnd(r, k, s=k ** -0.5, dt=adapter_dtype), rnd(n, r, dt=adapter_dtype)
    s_act, ds = rnd(m, r, dt=adapter_dtype), rnd(m, r, dt=torch.float32)
    f = {key: v.double() for key, v in dict(x=x, dy=dy, a=a, b=b, s=s_act, ds=ds).items()}
    got_s = dense.shrink(x, a)
    assert got_s.dtype == torch.float32 and rel(got_s, f["x"] @ f["a"].t()) < 5e-3  # S: the fp32 sums
    got_ds, got_db = dense.ds_db(dy, b, s_act, 2.0)
    assert got_ds.dtype == torch.float32 and rel(got_ds, 2.0 * f["dy"] @ f["b"]) < 5e-3
    assert got_db.dtype == adapter_dtype and rel(got_db, 2.0 * f["dy"].t() @ f["s"]) < 5e-3
    got_da = dense.da(x, ds, adapter_dtype)
    assert got_da.dtype == adapter_dtype and rel(got_da, f["ds"].t() @ f["x"]) < 5e-3


@needs_gpu
@pytest.mark.parametrize("r", [64, 128])
def test_the_op_with_the_triton_set_at_large_rank_matches_the_reference(r):
    g = torch.Generator().manual_seed(r)
    m, k, n = 1024, 2048, 1536
    x0 = torch.randn(m, k, generator=g).to("cuda", BF)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to("cuda", BF)
    a0 = (torch.randn(r, k, generator=g) * k ** -0.5).cuda()
    b0 = (torch.randn(n, r, generator=g) * r ** -0.5).cuda()
    dy = torch.randn(m, n, generator=g).to("cuda", BF)
    grads = {}
    for kernels in ("torch", "triton"):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        y = lora_linear(x, w, None, a, b, 2.0, 0.0, BF, kernels, False)[0]
        y.backward(dy)
        grads[kernels] = (y, x.grad, a.grad, b.grad)
    for name, got, want in zip(("y", "dX", "dA", "dB"), grads["triton"], grads["torch"]):
        assert rel(got, want) < 1e-2, f"{name} r={r}: {rel(got, want):.2e}"
