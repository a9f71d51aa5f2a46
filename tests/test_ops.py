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
    y, s_act, seed, _ = lora_linear(x, w, b, a, bb, 1.5, p, torch.float64, "torch", False)
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
    y, _, _, _ = lora_linear(x, w, b, a, bb, 2.0, 0.0, torch.float16, "torch", False)
    ref = (F.linear(x, w, b) + F.linear(F.linear(x.float(), a), bb) * 2.0).to(torch.float16)
    assert y.dtype == torch.float16
    assert_rel_close(y, ref, 1e-3, "y")
    dy = torch.randn_like(y)
    for got, want, name in zip(torch.autograd.grad(y, (x, a, bb), dy), torch.autograd.grad(ref, (x, a, bb), dy), "x A B".split()):
        assert got.dtype == want.dtype, name
        assert_rel_close(got, want, 2e-3, f"d{name}")


def test_no_input_grad_skips_dx():
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False, x_grad=False)
    y, _, _, _ = lora_linear(x, w, b, a, bb, 1.0, 0.0, torch.float64, "torch", False)
    y.sum().backward()
    assert x.grad is None and a.grad is not None and bb.grad is not None


def test_backward_fills_no_zero_gradients_for_s_and_seed():
    """S and the seed are outputs without gradients: the backward must not materialise zeros for them
    (on a GPU each would be a fill launch per layer)."""
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False)
    y, _, _, _ = lora_linear(x, w, b, a, bb, 1.0, 0.25, torch.float64, "torch", False)
    assert zero_fills_in(lambda: y.backward(torch.randn_like(y))) == []
    # only S used (y not): nothing flows back through the op, and nothing fails
    x, w, b, a, bb = _operands((8,), 12, 10, 3, bias=False)
    _, s_act, _, _ = lora_linear(x, w, b, a, bb, 1.0, 0.25, torch.float64, "torch", False)
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
    y, _, _, _ = lora_linear(x, w, b, a, bb, 1.0, 0.0, torch.float64, "torch", False)
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


def _with_and_without_saved_bits(monkeypatch, x, w, b, a, bb, p, *, compiled: bool = False):
    """(y, grads, bits) of the op with the torch set saving no keep bits, then saving them (``saves_keep_bits``
    patched to say yes); the seed drawn from the same RNG state both times."""
    from lorafusion_compiler.ops import reference

    def layer(x, a, bb):
        return torch.ops.lorafusion.lora_linear(x, w, b, a, bb, 1.5, p, torch.float64, "torch", False)

    fn = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    runs = []
    for saves in (False, True):
        monkeypatch.setattr(reference, "saves_keep_bits", lambda *args, saves=saves, **kw: saves)
        torch._dynamo.reset()
        torch.manual_seed(7)
        y, _s, seed, bits = fn(x, a, bb)
        runs.append((y, torch.autograd.grad(y, (x, a, bb), torch.ones_like(y)), bits, seed))
    return runs


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_keep_bits_saved_by_the_forward_give_the_same_outputs_and_grads(monkeypatch, compiled):
    """A set that saves the mask as keep bits (the Gluon set on Hopper) gets the same y and gradients: shrink
    stores the bits, dA and dX read them instead of regenerating the mask; the fake returns the same shape."""
    from lorafusion_compiler.ops.dropout_mask import pack_keep_bits

    x, w, b, a, bb = _operands((3, 13), 48, 20, 4, bias=True)
    (y0, g0, bits0, seed0), (y1, g1, bits1, seed1) = _with_and_without_saved_bits(monkeypatch, x, w, b, a, bb, 0.25,
                                                                                   compiled=compiled)
    assert torch.equal(seed0, seed1) and bits0.shape == (0, 0)
    assert bits1.dtype == torch.uint8 and torch.equal(bits1, pack_keep_bits(keep_mask(seed1, 0.25, 39, 48)))
    assert torch.equal(y0, y1)
    for name, got, want in zip(("dx", "dA", "dB"), g1, g0):
        assert torch.equal(got, want), name


def test_the_backward_reads_the_saved_bits(monkeypatch):
    """With saved bits the mask of dA and dX is the bits' (flipped bits flip the gradients), not the seed's."""
    from lorafusion_compiler.ops import lora_linear_backward

    x, w, _b, a, bb = _operands((16,), 24, 10, 3, bias=False)
    seed = torch.tensor(5)
    dy = torch.randn(16, 10, dtype=torch.float64)
    s = torch.randn(16, 3, dtype=torch.float64)
    saved = torch.full((16, 3), 0xFF, dtype=torch.uint8)  # keep all
    got = lora_linear_backward(dy, x.detach(), w, a.detach(), bb.detach(), s, seed, saved, 1.0, 0.5, True, "torch",
                               False)
    no_bits = torch.empty(0, 0, dtype=torch.uint8)
    want = lora_linear_backward(dy, x.detach(), w, a.detach(), bb.detach(), s, seed, no_bits, 1.0, 0.0, True, "torch",
                                False)  # p = 0 keeps all too, without the 1/(1-p) scale
    assert_rel_close(got[0] - dy @ w, 2 * (want[0] - dy @ w), 1e-12, "dX's low-rank term")
    assert_rel_close(got[1], 2 * want[1], 1e-12, "dA")


def test_da_refuses_to_store_and_read_bits_at_once():
    x, _w, _b, _a, _bb = _operands((16,), 24, 10, 3, bias=False)
    bits = torch.zeros(16, 3, dtype=torch.uint8)
    from lorafusion_compiler.ops import reference

    with pytest.raises(ValueError, match="keep_bits and stored_bits given together"):
        reference.da(x.detach(), torch.randn(16, 3, dtype=torch.float64), torch.tensor(1), 0.1, torch.float64,
                     keep_bits=bits, stored_bits=bits.clone())


def test_opcheck_with_and_without_saved_bits(monkeypatch):
    from lorafusion_compiler.ops import reference

    x, w, b, a, bb = _operands((6,), 16, 10, 2, bias=True, dtype=torch.float32)
    for saves in (False, True):
        monkeypatch.setattr(reference, "saves_keep_bits", lambda *args, saves=saves, **kw: saves)
        args = (x, w, b, a, bb, 0.5, 0.2, torch.float32, "torch", False)
        torch.library.opcheck(torch.ops.lorafusion.lora_linear.default, args)


def test_saved_keep_bits_follow_dynamic_batch_sizes(monkeypatch):
    """Compiled with dynamic shapes, the fake's bits shape [M, K/8] follows M: three batch sizes through one graph
    give eager's y and gradients bitwise (the torch set, told to save the bits)."""
    from lorafusion_compiler.ops import reference

    monkeypatch.setattr(reference, "saves_keep_bits", lambda *args, **kw: True)
    _x, w, _b, a, bb = _operands((7,), 48, 20, 4, bias=False)

    def layer(x):
        return torch.ops.lorafusion.lora_linear(x, w, None, a, bb, 1.5, 0.25, torch.float64, "torch", False)[0]

    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    for m in (7, 13, 29):
        x = torch.randn(m, 48, dtype=torch.float64, requires_grad=True)
        runs = []
        for fn in (compiled, layer):
            torch.manual_seed(1)
            y = fn(x)
            runs.append((y, *torch.autograd.grad(y, (x, a, bb), torch.ones_like(y))))
        for name, got, want in zip(("y", "dx", "dA", "dB"), *runs):
            assert torch.equal(got, want), f"{name} at M={m}"
