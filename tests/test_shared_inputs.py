"""The ``share_inputs`` rewrite: sites without dropout that read one x become one shared op."""

import os

import pytest
import torch
from helpers import assert_rel_close, compare_compiled_to_eager
from torch import nn

from lorafusion_compiler.codegen import rank_bucket
from lorafusion_compiler.ops.lora_linear import lora_linear
from lorafusion_compiler.ops.lora_linear_shared import lora_linear_shared

_GRAPHS: list[torch.fx.GraphModule] = []


def _keep_graph(gm, example_inputs):
    """Inner backend that records the rewritten graph and runs it as is."""
    _GRAPHS.append(gm)
    return gm.forward


torch._dynamo.register_backend(_keep_graph, name="lorafusion_test_keep_graph")


def _count(target) -> int:
    return sum(node.target is target for gm in _GRAPHS for node in gm.graph.nodes)


def _groups(report) -> list[list[str]]:
    return [[path.rsplit(".", 1)[-1] for path in group] for group in report.shared]


class Block(nn.Module):
    """q/k/v on one input, o on another, gate/up on a third: like a transformer block's linears
    (k is called twice: two sites of one adapter in one group, whose A and B gradients add up)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 24), nn.Linear(16, 8, bias=False), nn.Linear(16, 8)
        self.o, self.gate, self.up = nn.Linear(24, 16, bias=False), nn.Linear(16, 40, bias=False), nn.Linear(16, 40)

    def forward(self, x):
        h = self.o(self.q(x) * torch.cat([self.k(x), self.v(x), self.k(x)], -1).sigmoid()) + x
        return self.gate(h).tanh() * self.up(h)


def _peft_block(p: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(target_modules=["q", "k", "v", "o", "gate", "up"], r=8, lora_alpha=8, lora_dropout=p))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)  # PEFT starts B at zero; random B exercises every gradient
    return model


_INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton kernels on CPU tensors run only in the interpreter (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=_INTERPRETED)])
def test_block_groups_qkv_and_gate_up(kernels):
    """share_inputs is on by default."""
    _GRAPHS.clear()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    report = compare_compiled_to_eager(_peft_block(0.0), x, inner_backend="lorafusion_test_keep_graph",
                                       options={"kernels": kernels})
    assert _groups(report) == [["q", "k", "v", "k"], ["gate", "up"]]
    assert _count(torch.ops.lorafusion.lora_linear_shared.default) == 2
    assert _count(torch.ops.lorafusion.lora_linear.default) == 1  # o reads its own input


def test_overlap_backward_option_reaches_every_op():
    """options={"overlap_backward": True} is an argument of every rewritten op, shared or not; on a CPU
    (no second stream) the results are those of eager PyTorch."""
    _GRAPHS.clear()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    compare_compiled_to_eager(_peft_block(0.0), x, inner_backend="lorafusion_test_keep_graph",
                              options={"share_inputs": True, "overlap_backward": True})
    targets = (torch.ops.lorafusion.lora_linear.default, torch.ops.lorafusion.lora_linear_shared.default)
    ops = [node for gm in _GRAPHS for node in gm.graph.nodes if node.target in targets]
    assert len(ops) == 3 and all(node.args[-1] is True for node in ops), [node.args[-1] for node in ops]


@pytest.mark.parametrize("options, p", [({}, 0.1), ({"share_inputs": False}, 0.0)], ids=["dropout", "option_off"])
def test_no_group_with_dropout_or_without_the_option(options, p):
    _GRAPHS.clear()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    report = compare_compiled_to_eager(_peft_block(p), x, inner_backend="lorafusion_test_keep_graph", options=options)
    assert report.shared == [] and len(report.matched) == 7
    assert _count(torch.ops.lorafusion.lora_linear_shared.default) == 0
    assert _count(torch.ops.lorafusion.lora_linear.default) == 7


def _sites(seed: int = 4, dtype=torch.float64):
    """Three sites on one x: ranks 4/8/3, with and without bias."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)
    x = rnd(2, 9, 12, grad=True)
    ws, bs = [rnd(10, 12), rnd(6, 12), rnd(7, 12)], [rnd(10), None, rnd(7)]
    a_s = [rnd(r, 12, grad=True) for r in (4, 8, 3)]
    b_s = [rnd(n, r, grad=True) for n, r in ((10, 4), (6, 8), (7, 3))]
    return x, ws, bs, a_s, b_s, [2.0, 0.5, 1.5]


def test_op_equals_separate_sites():
    x, ws, bs, a_s, b_s, scales = _sites()
    ys, s_all = lora_linear_shared(x, ws, bs, a_s, b_s, scales, torch.float64, "torch", False)
    assert s_all.shape == (18, 15)
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    got = [t.grad.clone() for t in (x, *a_s, *b_s)]
    for t in (x, *a_s, *b_s):
        t.grad = None
    for i, (w, b, a, lb, s, dy) in enumerate(zip(ws, bs, a_s, b_s, scales, dys)):
        y, _s, _seed, _bits = lora_linear(x, w, b, a, lb, s, 0.0, torch.float64, "torch", False)
        assert_rel_close(ys[i], y, 1e-12, f"y of site {i}")
        y.backward(dy)
    for name, g, t in zip(["x", "A0", "A1", "A2", "B0", "B1", "B2"], got, (x, *a_s, *b_s)):
        assert_rel_close(g, t.grad, 1e-12, f"grad of {name}")


@pytest.mark.parametrize("overlap", [(), (True,)], ids=["default", "overlap_backward"])
def test_opcheck(overlap):
    """Schema, fake and autograd registration; with ``overlap_backward=True`` autograd sees one more
    input than with the default, which the dispatcher drops."""
    x, ws, bs, a_s, b_s, scales = _sites(dtype=torch.float32)
    torch.library.opcheck(lora_linear_shared, (x, ws, bs, a_s, b_s, scales, torch.float32, "torch", False, *overlap))


def test_bad_inputs_name_the_value():
    x, ws, bs, a_s, b_s, scales = _sites(dtype=torch.float32)
    with pytest.raises(ValueError, match="site 1 has torch.float64 adapters but site 0 has torch.float32"):
        lora_linear_shared(x, ws, bs, [a_s[0], a_s[1].double(), a_s[2]], [b_s[0], b_s[1].double(), b_s[2]],
                           scales, torch.float32, "torch", False)
    with pytest.raises(ValueError, match="one weight, bias, lora_a, lora_b and scale per site, got 3, 3, 3, 3, 2"):
        lora_linear_shared(x, ws, bs, a_s, b_s, scales[:2], torch.float32, "torch", False)


@_INTERPRETED
def test_explain_and_dump_name_the_group(tmp_path):
    import json

    import lorafusion

    report = lorafusion.explain(_peft_block(0.0), torch.randn(4, 16), share_inputs=True, kernels="triton",
                                dump_dir=str(tmp_path))
    assert "one shared-input op (x read once by shrink and dA): base_model.model.gate, base_model.model.up" in str(report)
    sites = {e["module_path"].rsplit(".", 1)[-1]: e for e in json.loads((tmp_path / "manifest.json").read_text())["sites"]}
    assert "shared_rank" not in sites["o"]
    assert (rank_bucket(8), rank_bucket(32)) == (16, 32)  # q/k/v/k: the group's shrink and dA have their own spec
    for name, total in (("q", 32), ("k", 32), ("v", 32), ("gate", 16), ("up", 16)):  # k is called twice
        entry = sites[name]
        assert entry["shared_rank"] == total
        assert entry["specialization"] in entry["files"]["base_expand"]  # the site's own rank (8)
        for kernel in ("shrink", "da"):  # the group's: specialised for the total rank
            rel = entry["files"][kernel]
            assert rel.startswith(entry["specialization"].replace("-r16-", f"-r{rank_bucket(total)}-")), (name, kernel, rel)
            assert "@triton.jit" in (tmp_path / rel).read_text()


def test_dx_sum_is_left_to_the_traced_backward_graph():
    """The backward op returns each site's share of dX and the sum is traced (G-1 adds in the
    backward graph), so Inductor can fuse it into dX's consumer as it does for separate sites;
    summed inside the op it cost unfusable eager adds."""
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    x, ws, bs, a_s, b_s, scales = _sites(dtype=torch.float32)
    g = len(a_s)

    def sites(x, *tensors):
        w, b, a, lb = (list(tensors[i * g:(i + 1) * g]) for i in range(4))
        return lora_linear_shared(x, w, b, a, lb, scales, torch.float32, "torch", False)[0]

    bs = [b if b is not None else torch.zeros(w.shape[0]) for w, b in zip(ws, bs)]  # aot_function: tensors only
    ys = aot_function(sites, fw_compiler=keep, bw_compiler=keep)(x, *ws, *bs, *a_s, *b_s)
    torch.autograd.backward(ys, [torch.randn_like(y) for y in ys])
    backward = graphs[-1].graph
    op = torch.ops.lorafusion.lora_linear_shared_backward.default
    assert sum(node.target is op for node in backward.nodes) == 1
    adds = [node for node in backward.nodes if node.target is torch.ops.aten.add.Tensor]
    assert len(adds) == g - 1, backward
    assert adds[-1] in backward.output_node().args[0], backward  # the sum is x's gradient
