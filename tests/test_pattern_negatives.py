"""LoRA look-alikes the pass must leave alone (or rewrite only partly), with unchanged results."""

import torch
from torch import nn

from helpers import compare_compiled_to_eager


class LookAlike(nn.Module):
    """base(x) + s * B(f(A(drop(x)))) with a configurable twist."""

    def __init__(self, twist: str):
        super().__init__()
        self.twist = twist
        self.weight = nn.Parameter(torch.randn(12, 16), requires_grad=twist == "trainable_base")
        self.a, self.b = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.randn(12, 4))
        self.vector_scale = nn.Parameter(torch.randn(12), requires_grad=False)
        self.hyper = nn.Linear(16, 16 * 4, bias=False)

    def forward(self, x):
        base = x @ self.weight.T
        a = self.a
        if self.twist == "a_from_x":
            a = self.hyper(x.mean(0)).reshape(4, 16)
        s_act = x @ a.T
        if self.twist == "activation":
            s_act = torch.relu(s_act)
        delta = s_act @ self.b.T
        if self.twist == "vector_scale":
            return base + delta * self.vector_scale
        if self.twist == "tensor_scale":
            return base + delta * self.vector_scale[0]
        if self.twist == "shared_intermediate":
            return base + delta * 0.5 + s_act.sum()
        return base + delta * 0.5


def _run(twist, shape=(5, 16)):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    return compare_compiled_to_eager(LookAlike(twist), x)


def test_activation_between_a_and_b_is_left_alone():
    report = _run("activation")
    assert report.matched == []
    assert any("'relu' between lora_A and lora_B" in s.reason for s in report.skipped)


def test_vector_scale_is_left_alone():
    report = _run("vector_scale")
    assert report.matched == []
    assert any("not a Python number" in s.reason for s in report.skipped)


def test_zero_dim_tensor_scale_is_left_alone():
    report = _run("tensor_scale")
    assert report.matched == []
    assert any("not a Python number" in s.reason for s in report.skipped)


def test_intermediate_used_elsewhere_is_left_alone():
    report = _run("shared_intermediate")
    assert report.matched == []
    assert any("used outside the LoRA branch" in s.reason for s in report.skipped)


def test_adapter_computed_from_input_is_left_alone():
    report = _run("a_from_x")
    assert report.matched == []
    assert any("computed from the LoRA input" in s.reason for s in report.skipped)


def test_trainable_base_keeps_its_own_linear():
    report = _run("trainable_base")
    # the LoRA term is still rewritten, but the base GEMM stays a normal linear so W gets its grad
    assert [s.fused_base for s in report.matched] == [False]
    assert any(s.reason.startswith("plain linear") for s in report.skipped)


def test_plain_linears_are_reported_not_rewritten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))
    model[2].weight.requires_grad_(False)
    report = compare_compiled_to_eager(model, torch.randn(3, 16))
    assert report.matched == [] and [s.module_path for s in report.skipped] == ["0", "2"]


def test_rewrite_disabled_only_reports():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    report = compare_compiled_to_eager(LookAlike("plain"), x, options={"rewrite": False})
    assert len(report.matched) == 1  # found and reported, graph left as is (results equal eager)
