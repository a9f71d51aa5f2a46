"""Every LoRA spelling the pass must match: matched, rewritten, and numerically equal to eager."""

import pytest
import torch
from torch import nn

from helpers import compare_compiled_to_eager


def _peft(base: nn.Module, targets, **lora):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(target_modules=targets, **{"r": 4, "lora_alpha": 8, **lora}))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)  # PEFT starts B at zero; random B exercises every gradient
    return model


class QKV(nn.Module):
    """Three projections sharing one input, plus an output projection without LoRA."""

    def __init__(self, bias=True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 24, bias=bias), nn.Linear(16, 8, bias=bias), nn.Linear(16, 8, bias=False)
        self.out = nn.Linear(24, 16)

    def forward(self, x):
        return self.out(torch.tanh(self.q(x))) + (self.k(x) * self.v(x)).sum(-1, keepdim=True)


def _x(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(7)).requires_grad_(grad)


def _fused(report):
    return [s.fused_base for s in report.matched]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_peft_linear_train(p, bias):
    torch.manual_seed(0)
    model = _peft(QKV(bias=bias), ["q", "k", "v"], lora_dropout=p)
    report = compare_compiled_to_eager(model, _x(2, 5, 16))
    assert len(report.matched) == 3 and all(_fused(report))
    assert [s.dropout_p for s in report.matched] == [p] * 3
    assert [s.has_bias for s in report.matched] == [bias, bias, False]
    assert [s.module_path for s in report.matched] == ["base_model.model.q", "base_model.model.k", "base_model.model.v"]
    assert {s.module_path for s in report.skipped} == {"base_model.model.out"}


def test_peft_eval_mode_applies_no_dropout():
    torch.manual_seed(0)
    model = _peft(QKV(), ["q", "k"], lora_dropout=0.3).eval()
    report = compare_compiled_to_eager(model, _x(7, 16))
    assert [(s.dropout_p, s.declared_dropout_p, s.training) for s in report.matched] == [(0.0, 0.3, False)] * 2


def test_peft_fp32_adapters_over_bf16_base():
    torch.manual_seed(0)
    model = _peft(QKV().to(torch.bfloat16), ["q", "k", "v"], lora_dropout=0.1)
    assert model.base_model.model.q.lora_A.default.weight.dtype == torch.float32
    report = compare_compiled_to_eager(model, _x(3, 4, 16, dtype=torch.bfloat16), tol=1e-2)
    assert len(report.matched) == 3
    assert {(s.dtype, s.adapter_dtype, s.out_dtype) for s in report.matched} == {(torch.bfloat16, torch.float32, torch.bfloat16)}


def test_peft_rslora_scale():
    torch.manual_seed(0)
    model = _peft(QKV(), ["q"], r=9, lora_alpha=6, use_rslora=True)
    report = compare_compiled_to_eager(model, _x(5, 16))
    assert report.matched[0].scale == pytest.approx(6 / 3) and report.matched[0].rank == 9


def test_peft_stacked_adapters_on_one_base():
    from peft import LoraConfig

    torch.manual_seed(0)
    model = _peft(QKV(), ["q"])
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q"]))
    model.base_model.set_adapter(["default", "second"])
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    report = compare_compiled_to_eager(model, _x(6, 16))
    assert [(s.rank, s.fused_base) for s in report.matched] == [(4, True), (2, False)]


class Torchtune(nn.Module):
    """torchtune style: scale on the left, separate modules for base, A, B."""

    def __init__(self, p=0.1):
        super().__init__()
        self.base = nn.Linear(16, 12).requires_grad_(False)
        self.lora_a, self.lora_b = nn.Linear(16, 3, bias=False), nn.Linear(3, 12, bias=False)
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.base(x) + (8 / 3) * self.lora_b(self.lora_a(self.dropout(x)))


class Plain(nn.Module):
    """``x @ W.T + (drop(x) @ A.T @ B.T) * s`` with operands in a chosen order."""

    def __init__(self, swap=False, p=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 16), requires_grad=False)
        self.a, self.b = nn.Parameter(torch.randn(5, 16)), nn.Parameter(torch.randn(12, 5))
        self.drop, self.swap = nn.Dropout(p), swap

    def forward(self, x):
        base, delta = x @ self.weight.T, (self.drop(x) @ self.a.T @ self.b.T) * 0.5
        return delta + base if self.swap else base + delta


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_torchtune_scale_on_the_left(p):
    torch.manual_seed(0)
    model = Torchtune(p)
    report = compare_compiled_to_eager(model, _x(2, 3, 16))
    assert len(report.matched) == 1 and report.matched[0].scale == pytest.approx(8 / 3)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("shape", [(9, 16), (2, 4, 16)])
def test_plain_matmul_module_either_order_2d_3d(swap, shape):
    torch.manual_seed(0)
    report = compare_compiled_to_eager(Plain(swap=swap, p=0.1), _x(*shape))
    assert len(report.matched) == 1 and report.matched[0].fused_base
    assert report.matched[0].x_shape == shape and report.matched[0].dropout_p == 0.1


def test_plain_module_under_inductor():
    torch.manual_seed(0)
    report = compare_compiled_to_eager(Plain(p=0.0), _x(2, 4, 16), inner_backend="inductor")
    assert len(report.matched) == 1


def test_input_without_grad_still_matches():
    torch.manual_seed(0)
    report = compare_compiled_to_eager(Plain(), _x(6, 16, grad=False))
    assert report.matched[0].x_requires_grad is False
