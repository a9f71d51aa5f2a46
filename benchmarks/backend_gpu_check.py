"""GPU check of the whole backend: PEFT tiny LLaMa compiled with backend="lorafusion" vs eager.

For fp32 and bf16 bases (PEFT default fp32 adapters, and bf16 adapters), p = 0 and 0.1:
every site must be matched and run on the Triton kernel set; the loss and every adapter
gradient are compared with eager PEFT (p = 0: plain eager; p > 0: eager with the same
seeded masks). CUDA-graph capture of the op is checked by ``benchmarks/gpu_check.py``.

    python benchmarks/backend_gpu_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import LossOf, adapter_grads, rel_error, use_seeded_dropout  # noqa: E402

from lorafusion_compiler.product.tiny_llama import TinyLlamaConfig, add_lora, build_tiny_llama  # noqa: E402
from lorafusion_compiler.report import collect_reports  # noqa: E402


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


def main() -> None:
    cases = [(dt, bf, p) for dt in (torch.float32, torch.bfloat16) for bf in ((False,) if dt == torch.float32 else (False, True)) for p in (0.0, 0.1)]
    rows = []
    for dtype, bf16, p in cases:
        rows.append(check(dtype, bf16, p))
        print(rows[-1], flush=True)
    print(f"backend on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'base':<9} {'adapters':<9} {'p':>4} {'sites':>5} {'triton':>6} {'loss rel err':>12} {'max grad rel err':>16}")
    ok = True
    for r in rows:
        tol = 1e-4 if r["dtype"] == "float32" else 2e-2
        good = r["sites"] == 14 and r["triton"] == 14 and r["loss_err"] <= tol and r["grad_err_max"] <= tol
        ok &= good
        print(f"{r['dtype']:<9} {r['adapters']:<9} {r['p']:>4} {r['sites']:>5} {r['triton']:>6} {r['loss_err']:>12.2e} {r['grad_err_max']:>16.2e} {'ok' if good else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
