"""GPU check of the whole backend: PEFT tiny LLaMa compiled with backend="lorafusion" vs eager.

For fp32 and bf16 bases (PEFT default fp32 adapters, and bf16 adapters), p = 0 and 0.1:
every site must be matched and run on the Triton kernel set; the loss and every adapter
gradient are compared with eager PEFT (p = 0: plain eager; p > 0: eager with the same
seeded masks). Then one compiled training step is captured in a CUDA graph and replayed.

    python benchmarks/backend_gpu_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import adapter_grads, rel_error, use_seeded_dropout  # noqa: E402

from lorafusion_compiler.product.tiny_llama import TinyLlamaConfig, add_lora, build_tiny_llama  # noqa: E402
from lorafusion_compiler.report import collect_reports  # noqa: E402


class LossOf(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids).loss


def check(dtype: torch.dtype, adapter_bf16: bool, p: float) -> dict:
    torch._dynamo.reset()
    config = TinyLlamaConfig(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=4)
    model = add_lora(build_tiny_llama(config, dtype=dtype), rank=16, alpha=32, dropout=p).cuda()
    if adapter_bf16:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
    model.train()
    ids = torch.randint(0, 256, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    wrapped = LossOf(model)
    compiled = torch.compile(wrapped, backend="lorafusion")
    torch.manual_seed(5)
    with collect_reports() as report:
        loss = compiled(ids)
    loss.backward()
    got = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    use_seeded_dropout(model)
    torch.manual_seed(5)
    ref = wrapped(ids)
    ref.backward()
    want = adapter_grads(model)
    errors = [rel_error(got[n], want[n]) for n in want]
    return dict(
        dtype=str(dtype).removeprefix("torch."), adapters="bf16" if adapter_bf16 else str(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype).removeprefix("torch."),
        p=p, sites=len(report.matched), triton=report.kernels.count("triton"),
        loss_err=rel_error(loss, ref), grad_err_max=max(errors), grads=len(errors),
    )


def cuda_graph_replay() -> float:
    """Capture forward+backward of one rewritten layer in a CUDA graph; replay; compare to eager run."""
    from lorafusion_compiler.ops import lora_linear

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    a = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    b = torch.randn(384, 16, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    def step():
        y = lora_linear(x, w, None, a, b, 2.0, 0.0, torch.bfloat16, "triton", True)[0]
        return torch.autograd.grad(y.float().square().sum(), (x, a, b))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()  # warm-up: compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    return max(rel_error(c, e) for c, e in zip(captured, eager))


def main() -> None:
    cases = [(dt, bf, p) for dt in (torch.float32, torch.bfloat16) for bf in ((False,) if dt == torch.float32 else (False, True)) for p in (0.0, 0.1)]
    rows = []
    for dtype, bf16, p in cases:
        rows.append(check(dtype, bf16, p))
        print(rows[-1], flush=True)
    graph_err = cuda_graph_replay()
    print(f"backend on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'base':<9} {'adapters':<9} {'p':>4} {'sites':>5} {'triton':>6} {'loss rel err':>12} {'max grad rel err':>16}")
    ok = True
    for r in rows:
        tol = 1e-4 if r["dtype"] == "float32" else 2e-2
        good = r["sites"] == 14 and r["triton"] == 14 and r["loss_err"] <= tol and r["grad_err_max"] <= tol
        ok &= good
        print(f"{r['dtype']:<9} {r['adapters']:<9} {r['p']:>4} {r['sites']:>5} {r['triton']:>6} {r['loss_err']:>12.2e} {r['grad_err_max']:>16.2e} {'ok' if good else 'FAIL'}")
    print(f"CUDA graph capture + replay of one layer's forward+backward: max rel err vs eager {graph_err:.2e} ({'ok' if graph_err < 1e-6 else 'FAIL'})")
    ok &= graph_err < 1e-6
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
