"""torch.ops.lorafusion.lora_linear (torch kernel set) against a float64 eager reference."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_rel_close, zero_fills_in
from lorafusion_compiler.ops import keep_mask, lora_linear


def _operands(batch_shape, k, n, r, *, bias, weight=True, dtype=torch.float64, x_grad=True):
    g = torch.Generator().manual_seed(hash((batch_shape, k, n, r)) % 2**31)
    x = torch.randn(*batch_shape, k, generator=g, dtype=dtype).requires_grad_(x_grad)
    w = torch.randn(n, k, generator=g, dtype=dtype) if weight else None
    b = torch.randn(n, generator=g, dtype=dtype) if bias else None
    a = torch.randn(r, k, generator=g, dtype=dtype).requires_grad_()
    bb = torch.randn(n, r, generator=g, dtype=dtype).requires_grad_()
    return x, w, b, a, bb


def _eager(x, w, b, a, bb, scale, mask, p):
    xd = x * mask / (1 - p)
    delta = (xd @ a.t() @ bb.t()) * scale
    return delta if w is None else F.linear(x, w, b) + delta


@pytest.mark.parametrize("batch_shape", [(37,), (3, 11)])
@pytest.mark.parametrize("k, n, r", [(70, 45, 5), (16, 24, 1), (33, 17, 24)])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias, weight", [(True, True), (False, True), (False, False)])
def test_forward_and_every_grad_match_reference(batch_shape, k, n, r, p, bias, weight):
    x, w, b, a, bb = _operands(batch_shape, k, n, r, bias=bias, weight=weight)
    y, s_act, seed = lora_linear(x, w, b, a, bb, 1.5, p, torch.float64, "torch", False)
    mask = keep_mask(seed, p, x.numel() // k, k).reshape(x.shape).double()
    ref = _eager(x, w, b, a, bb, 1.5, mask, p)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    ref_grads = torch.autograd.grad(ref, (x, a, bb), dy)
    assert_rel_close(y, ref, 1e-12, "y")
    assert s_act.shape == (x.numel() // k, r)
    for name, got, want in zip(("dx", "dA", "dB"), grads, ref_grads):
        assert_rel_close(got, want, 1e-12, name)


def test_fp32_adapter_over_fp16_base_matches_peft_semantics():
    x, w, b, _, _ = _operands((9, 5), 32, 20, 4, bias=True, dtype=torch.float16)
    a = torch.randn(4, 32, requires_grad=True)
    bb = torch.randn(20, 4, requires_grad=True)
    y, _, _ = lora_linear(x, w, b, a, bb, 2.0, 0.0, torch.float16, "torch", False)
    ref = (F.linear(x, w, b) + F.linear(F.linear(x.float(), a), bb) * 2.0).to(torch.float16)
    assert y.dtype == torch.float16
    assert_rel_close(y, ref, 1e-3, "y")
    dy = torch.randn_like(y)
    for got, want, name in zip(torch.autograd.grad(y, (x, a, bb), dy), torch.autograd.grad(ref, (x, a, bb), dy), "x A B".split()):
        assert got.dtype == want.dtype, name
        assert_rel_close(got, want, 2e-3, f"d{name}")


def test_no_input_grad_skips_dx():
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False, x_grad=False)
    y, _, _ = lora_linear(x, w, b, a, bb, 1.0, 0.0, torch.float64, "torch", False)
    y.sum().backward()
    assert x.grad is None and a.grad is not None and bb.grad is not None


def test_backward_fills_no_zero_gradients_for_s_and_seed():
    """S and the seed are outputs without gradients: the backward must not materialise zeros for them
    (on a GPU each would be a fill launch per layer)."""
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False)
    y, _, _ = lora_linear(x, w, b, a, bb, 1.0, 0.25, torch.float64, "torch", False)
    assert zero_fills_in(lambda: y.backward(torch.randn_like(y))) == []
    # only S used (y not): nothing flows back through the op, and nothing fails
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False)
    _, s_act, _ = lora_linear(x, w, b, a, bb, 1.0, 0.25, torch.float64, "torch", False)
    (s_act.sum() + (a * 0).sum()).backward()
    assert x.grad is None and bb.grad is None and torch.equal(a.grad, torch.zeros_like(a))


def test_fresh_seed_per_call_and_saved_tensors_are_small():
    x, w, b, a, bb = _operands((64,), 48, 40, 4, bias=False)
    seeds = [lora_linear(x, w, b, a, bb, 1.0, 0.5, torch.float64, "torch", False)[2] for _ in range(2)]
    assert seeds[0].item() != seeds[1].item()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        lora_linear(x, w, b, a, bb, 1.0, 0.5, torch.float64, "torch", False)
    # x, W, A, B, S [M, r] and the seed; nothing else of size M x K (no mask, no dropped x)
    big = [s for s in saved if len(s) == 2 and s[0] == 64 and s[1] != 4]
    assert big == [torch.Size([64, 48])], saved


def test_trainable_base_weight_is_refused_in_backward():
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False)
    w.requires_grad_()
    y, _, _ = lora_linear(x, w, b, a, bb, 1.0, 0.0, torch.float64, "torch", False)
    with pytest.raises(RuntimeError, match="frozen"):
        y.sum().backward()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda o: o.update(a=torch.randn(0, 12, dtype=torch.float64)), "rank is 0"),
        (lambda o: o.update(bb=torch.randn(10, 4, dtype=torch.float64)), "rank mismatch"),
        (lambda o: o.update(x=torch.randn(8, 13, dtype=torch.float64)), "x has 13 features"),
        (lambda o: o.update(w=torch.randn(10, 11, dtype=torch.float64)), r"weight has shape \(10, 11\)"),
        (lambda o: o.update(w=torch.randn(10, 12, dtype=torch.float32)), "weight is torch.float32"),
        (lambda o: o.update(p=1.0), r"p=1.0"),
        (lambda o: o.update(p=-0.5), r"p=-0.5"),
        (lambda o: o.update(bb=torch.randn(10, 3, dtype=torch.float32)), "lora_b is torch.float32"),
    ],
)
def test_bad_input_names_value(change, message):
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False)
    operands = dict(x=x, w=w, a=a, bb=bb, p=0.1)
    change(operands)
    o = operands
    with pytest.raises(ValueError, match=message):
        lora_linear(o["x"], o["w"], None, o["a"], o["bb"], 1.0, o["p"], torch.float64, "torch", False)


def test_unknown_kernel_set_is_named():
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False)
    with pytest.raises(ValueError, match="'cuda-magic'"):
        lora_linear(x, w, b, a, bb, 1.0, 0.0, torch.float64, "cuda-magic", False)


def test_op_compiles_under_inductor_and_matches_eager():
    x, w, b, a, bb = _operands((4, 6), 20, 14, 3, bias=True, dtype=torch.float32)

    def layer(x, w, b, a, bb):
        return torch.ops.lorafusion.lora_linear(x, w, b, a, bb, 0.5, 0.0, torch.float32, "torch", False)[0]

    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    y = compiled(x, w, b, a, bb)
    ref = layer(x, w, b, a, bb)
    assert_rel_close(y, ref, 1e-6, "y")
    dy = torch.randn_like(y)
    for got, want, name in zip(torch.autograd.grad(y, (x, a, bb), dy), torch.autograd.grad(ref, (x, a, bb), dy), "x A B".split()):
        assert_rel_close(got, want, 1e-6, f"d{name}")
