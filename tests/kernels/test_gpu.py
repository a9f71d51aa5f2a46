"""bf16 checks of the op on the GPU (the benchmark shapes plus an odd one), with the Triton and the
Gluon kernel sets (the latter runs Gluon GEMMs on Hopper only); skipped without CUDA."""

from __future__ import annotations

import math
import time

import pytest
import torch

from lorafusion_compiler.ops import reference as ref
from lorafusion_compiler.ops.lora_linear import lora_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16), (8192, 5120, 5120, 16),
          (8192, 8192, 8192, 16), (2048, 4096, 4096, 16), (1000, 4000, 3000, 24)]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kernels", ["triton", "gluon", "gluon-gemms"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_op_vs_float64(shape, p, kernels):
    m, k, n, r = shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    a = (torch.randn(r, k, device="cuda") / math.sqrt(k)).requires_grad_()  # PEFT default: fp32 adapters
    b = torch.randn(n, r, device="cuda").requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y, _, seed, _ = lora_linear(x, w, bias, a, b, 32.0 / r, p, torch.bfloat16, kernels, False)
    y.backward(dy)
    d = torch.float64
    s = ref.shrink(x.detach().to(d), a.detach().to(d), seed, p)
    y_ref = ref.base_expand(x.detach().to(d), w.to(d), bias.to(d), s, b.detach().to(d), 32.0 / r, d)
    ds, db = ref.ds_db(dy.to(d), b.detach().to(d), s, 32.0 / r)
    da = ref.da(x.detach().to(d), ds, seed, p, d)
    dx = ref.dx(dy.to(d), w.to(d), ds, a.detach().to(d), seed, p, d)
    errs = {"y": rel(y, y_ref), "dX": rel(x.grad, dx), "dA": rel(a.grad, da), "dB": rel(b.grad, db)}
    assert max(errs.values()) <= 1e-2, errs


def test_tuner_times_the_kernels_not_the_host():
    """A candidate whose launch spends 2 ms on the host before a tiny kernel is timed by its kernel."""
    from lorafusion_compiler.codegen.autotune import _gpu_ms

    x = torch.randn(1 << 16, device="cuda")

    def slow_host_launch():
        time.sleep(2e-3)
        x.mul_(1.0001)

    assert _gpu_ms(slow_host_launch) < 0.2  # ms: the 2 ms of host time per call are not in it
    assert _gpu_ms(lambda: torch.cuda._sleep(2_000_000)) > 0.5  # 2M clock ticks at <= 2 GHz: >= 1 ms
