"""Multi-adapter training: each adapter's gradients equal training it alone on its own rows."""

import pytest
import torch
import torch.nn.functional as F

from helpers import ADAPTERS, assert_rel_close, peft_with_adapters, zero_fills_in
from lorafusion_compiler.ops.multi_lora_linear import multi_lora_linear
from lorafusion_compiler.ops import keep_mask
from lorafusion_compiler.runtime import AdapterBatch, MultiAdapterModel

def _sum_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def test_each_adapter_grad_equals_training_it_alone():
    names = list(ADAPTERS)
    seq_adapter = [0, 0, 1, 2, 2, 2]  # adapter "unused" has no rows
    ids = torch.randint(0, 256, (len(seq_adapter), 16), generator=torch.Generator().manual_seed(2))
    multi = MultiAdapterModel(peft_with_adapters(names))
    batch = AdapterBatch.from_sequence_adapters(seq_adapter, seq_len=16, num_adapters=len(names))
    _sum_loss(multi(batch, input_ids=ids).logits, ids).backward()
    got = {n: [p.grad.clone() for p in multi.adapter_parameters(n)] for n in names}

    assert all(g.abs().sum() == 0 for g in got["unused"])
    for i, name in enumerate(names[:3]):
        alone = peft_with_adapters(names)
        alone.base_model.set_adapter(name)
        rows = [b for b, a in enumerate(seq_adapter) if a == i]
        _sum_loss(alone(input_ids=ids[rows]).logits, ids[rows]).backward()
        want = [p.grad for n, p in alone.named_parameters() if f".{name}." in n and "lora_" in n]
        assert len(want) == len(got[name]) == 12  # 2 layers x 3 targets x (A, B)
        for k, (g, w) in enumerate(zip(got[name], want)):
            assert_rel_close(g, w, 1e-5, f"adapter {name} param {k}")


def test_compiled_multi_adapter_matches_eager():
    names = list(ADAPTERS)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    batch = AdapterBatch.from_sequence_adapters([0, 1, 1, 2], seq_len=16, num_adapters=4)
    eager = MultiAdapterModel(peft_with_adapters(names))
    compiled_model = MultiAdapterModel(peft_with_adapters(names))
    compiled = torch.compile(compiled_model, backend="lorafusion")
    loss_c = _sum_loss(compiled(batch, input_ids=ids).logits, ids)
    loss_e = _sum_loss(eager(batch, input_ids=ids).logits, ids)
    loss_c.backward()
    loss_e.backward()
    assert_rel_close(loss_c, loss_e, 1e-5, "loss")
    for name in names[:3]:
        for k, (g, w) in enumerate(zip(compiled_model.adapter_parameters(name), eager.adapter_parameters(name))):
            assert_rel_close(g.grad, w.grad, 1e-5, f"{name} param {k}")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_op_matches_per_adapter_reference_with_dropout(p):
    g = torch.Generator().manual_seed(9)
    k, n = 24, 10
    ranks = [1, 5, 3]
    batch = AdapterBatch.from_counts([7, 0, 13], pad_multiple=4)  # an adapter with no rows; odd lengths
    x = torch.randn(batch.total_rows, k, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    a = [torch.randn(r, k, generator=g, dtype=torch.float64, requires_grad=True) for r in ranks]
    b = [torch.randn(n, r, generator=g, dtype=torch.float64, requires_grad=True) for r in ranks]
    y, _, seeds = multi_lora_linear(x, w, None, a, b, [0.5, 1.0, 2.0], [p] * 3, batch.adapter_rows, torch.float64, "torch", False, None)
    ref = x @ w.t()
    pieces = [ref]
    for i, (start, count) in enumerate(batch.adapter_rows.tolist()):
        if count:
            xi = x[start : start + count]
            mask = keep_mask(seeds[i], p, count, k).double() / (1 - p)
            delta = torch.zeros_like(ref)
            delta[start : start + count] = ((xi * mask) @ a[i].t() @ b[i].t()) * [0.5, 1.0, 2.0][i]
            pieces.append(delta)
    ref = sum(pieces)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    assert_rel_close(y, ref, 1e-12, "y")
    got = torch.autograd.grad(y, [x, *a, *b], dy)
    inputs = [x, *a, *b]
    want = torch.autograd.grad(ref, inputs, dy, allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for t, w in zip(inputs, want)]
    for i, (gg, ww) in enumerate(zip(got, want)):
        assert_rel_close(gg, ww, 1e-12, f"grad {i}")
    assert got[2].abs().sum() == 0  # adapter 1 has no rows


def test_op_backward_fills_no_zero_gradients_for_s_and_seeds():
    batch = AdapterBatch.from_counts([5, 3], pad_multiple=4)
    x = torch.randn(batch.total_rows, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64)
    a = [torch.randn(2, 6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    b = [torch.randn(4, 2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    y, s_act, _ = multi_lora_linear(x, w, None, a, b, [1.0, 1.0], [0.2, 0.2], batch.adapter_rows, torch.float64,
                                    "torch", False, None)
    assert zero_fills_in(lambda: y.backward(torch.ones_like(y), retain_graph=True)) == []
    x.grad = None
    s_act.sum().backward()  # only S used (y not): nothing flows back through the op, and nothing fails
    assert x.grad is None


@pytest.mark.parametrize(
    "counts, rows_override, message",
    [
        ([3, 4], torch.tensor([[0, 3], [2, 4]]), "overlap"),
        ([3, 4], torch.tensor([[0, 3], [3, 9]]), "leave the"),
        ([3, 4], torch.tensor([[0, 3]]), r"shape \(2, 2\)"),
    ],
)
def test_bad_routing_is_named(counts, rows_override, message):
    x = torch.randn(7, 6)
    a = [torch.randn(2, 6), torch.randn(3, 6)]
    b = [torch.randn(5, 2), torch.randn(5, 3)]
    with pytest.raises(ValueError, match=message):
        multi_lora_linear(x, None, None, a, b, [1.0, 1.0], [0.0, 0.0], rows_override, torch.float32, "torch", False, None)


def test_rank_mismatch_and_unknown_adapter_are_named():
    with pytest.raises(ValueError, match="adapter 1: rank mismatch"):
        multi_lora_linear(torch.randn(4, 6), None, None, [torch.randn(2, 6), torch.randn(3, 6)], [torch.randn(5, 2), torch.randn(5, 2)],
                          [1.0, 1.0], [0.0, 0.0], torch.tensor([[0, 2], [2, 2]]), torch.float32, "torch", False, None)
    with pytest.raises(ValueError, match="sequence 2 names adapter 7"):
        AdapterBatch.from_sequence_adapters([0, 1, 7], seq_len=4, num_adapters=2)
    with pytest.raises(ValueError, match="grouped by adapter"):
        AdapterBatch.from_sequence_adapters([1, 0], seq_len=4, num_adapters=2)
    with pytest.raises(ValueError, match="row count -1"):
        AdapterBatch.from_counts([3, -1])
