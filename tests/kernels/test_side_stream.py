"""dA beside dX (``ops.side_stream``, option ``overlap_backward``): order and fallback on the CPU;
on the GPU the kernels really run on two streams, the gradients equal the one-stream kernel
sequence bit for bit, and a CUDA-graph capture of the backward replays them."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from lorafusion_compiler.ops.lora_linear import lora_linear, lora_linear_backward
from lorafusion_compiler.ops.side_stream import beside, side_stream

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def one_config(monkeypatch):
    """The first tile configuration everywhere, so the two-stream and the one-stream kernels (other
    specialisations: with / without keep bits) sum in the same order and compare bit for bit."""
    monkeypatch.setenv("LORAFUSION_TUNE_MAX", "1")


def test_no_side_stream_off_cuda_and_one_stream_runs_side_first():
    assert side_stream(torch.device("cpu")) is None
    calls = []
    result = beside(None, lambda: calls.append("side") or 1, lambda: calls.append("main") or 2)
    assert result == (1, 2)
    assert calls == ["side", "main"]


def _operands(m: int, k: int, n: int, r: int):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    a = (torch.randn(r, k, device="cuda") / math.sqrt(k)).requires_grad_()
    b = torch.randn(n, r, device="cuda").requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    return x, w, a, b, dy


def _grads(x, w, a, b, dy, p):
    for t in (x, a, b):
        t.grad = None
    y, s, seed, _bits = lora_linear(x, w, None, a, b, 2.0, p, torch.bfloat16, "triton", True, True)  # deterministic, overlap
    y.backward(dy)
    return x.grad.clone(), a.grad.clone(), b.grad.clone(), s.detach(), seed


def _one_stream_backward(x, w, a, b, dy, s, seed, p):
    """The op's backward without ``overlap_backward``: dA then dX on the current stream, the mask
    handed over as keep bits."""
    no_bits = torch.empty(0, 0, dtype=torch.uint8, device=x.device)  # the triton set saves none
    return lora_linear_backward(dy, x.detach(), w, a.detach(), b.detach(), s, seed, no_bits, 2.0, p, True, "triton",
                                True, False)


@gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_backward_beside_equals_one_stream_sequence(p):
    x, w, a, b, dy = _operands(1000, 1024, 768, 16)
    d_x, d_a, d_b, s, seed = _grads(x, w, a, b, dy, p)
    want_x, want_a, want_b = _one_stream_backward(x, w, a, b, dy, s, seed, p)
    assert torch.equal(d_x, want_x) and torch.equal(d_a, want_a) and torch.equal(d_b, want_b)


@gpu
def test_da_and_dx_kernels_run_on_two_streams(tmp_path):
    x, w, a, b, dy = _operands(1024, 1024, 1024, 16)
    _grads(x, w, a, b, dy, 0.1)  # tune and compile outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _grads(x, w, a, b, dy, 0.1)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    streams = {name: {e["args"]["stream"] for e in events if e.get("cat") == "kernel" and e["name"] == name}
               for name in ("da_kernel", "dx_kernel")}
    assert len(streams["da_kernel"]) == 1 and len(streams["dx_kernel"]) == 1, streams
    assert streams["da_kernel"] != streams["dx_kernel"]


@gpu
def test_captured_backward_replays_the_eager_gradients():
    x, w, a, b, dy = _operands(1024, 2048, 1024, 16)
    eager_d_a = _grads(x, w, a, b, dy, 0.1)[1]
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        _grads(x, w, a, b, dy, 0.1)
    torch.cuda.current_stream().wait_stream(warm)
    for t in (x, a, b):
        t.grad = None
    gc.collect()  # no stale eager autograd graph on the legacy stream in the capture (benchmarks/cuda_graph.py)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, s, seed, _bits = lora_linear(x, w, None, a, b, 2.0, 0.1, torch.bfloat16, "triton", True, True)
        y.backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    # each replay draws a fresh seed: compare with the one-stream kernels on this replay's S and seed
    want_x, want_a, want_b = _one_stream_backward(x, w, a, b, dy, s.detach(), seed, 0.1)
    assert torch.equal(x.grad, want_x) and torch.equal(a.grad, want_a) and torch.equal(b.grad, want_b)
    assert not torch.equal(want_a, eager_d_a)  # the replay drew its own mask


@gpu
def test_backend_cuda_graphs_record_the_two_stream_backward():
    """The compiled tiny LLaMa (p=0: the same mask-free math either way) with options={"cudagraphs": True}
    is recorded as CUDA graphs, side stream and all, and trains what the plain compiled model trains."""
    from torch._dynamo.utils import counters

    from lorafusion_compiler.product.tiny_llama import add_lora, build_tiny_llama

    ids = torch.randint(0, 256, (2, 64), device="cuda")

    def run(cudagraphs: bool):
        torch._dynamo.reset()
        model = add_lora(build_tiny_llama(seed=0).to("cuda"), rank=8, alpha=16, dropout=0.0)
        compiled = torch.compile(model, backend="lorafusion", options={"cudagraphs": cudagraphs, "overlap_backward": True})
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(3):  # warm-up, record, replay
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            for p in params:
                p.grad = None
            loss = compiled(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    plain_loss, plain_grads = run(False)
    counters.clear()
    graphed_loss, graphed_grads = run(True)
    assert counters["inductor"]["cudagraph_skips"] == 0, "not recorded as CUDA graphs"
    assert graphed_loss == pytest.approx(plain_loss, rel=1e-5)
    for got, want in zip(graphed_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
