"""Acceptance: a PEFT-wrapped tiny LlamaForCausalLM, LoRA on all 7 projections, compiled with Inductor."""

import pytest
import torch

from helpers import LossOf, adapter_grads, assert_rel_close, use_seeded_dropout
from lorafusion_compiler.product.tiny_llama import TinyLlamaConfig, add_lora, build_tiny_llama
from lorafusion_compiler.report import collect_reports


@pytest.mark.parametrize("p, share", [(0.0, False), (0.1, False), (0.0, True)], ids=["p0", "p0.1", "p0-share_inputs"])
def test_tiny_llama_all_projections_match_eager(p, share):
    model = add_lora(build_tiny_llama(TinyLlamaConfig(num_layers=2)), rank=8, alpha=16, dropout=p)
    model.train()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    wrapped = LossOf(model)
    compiled = torch.compile(wrapped, backend="lorafusion", options={"share_inputs": share})  # Inductor for the rest
    torch.manual_seed(11)
    with collect_reports() as report:
        loss = compiled(ids)
    loss.backward()
    got = adapter_grads(model)
    model.zero_grad(set_to_none=True)

    assert len(report.matched) == 14 and all(s.fused_base for s in report.matched)
    assert {s.module_path.rsplit(".", 1)[-1] for s in report.matched} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert [s.module_path for s in report.skipped] == ["model.base_model.model.lm_head"]
    groups = [[path.rsplit(".", 1)[-1] for path in group] for group in report.shared]
    assert groups == ([["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2 if share else [])

    if p:
        assert use_seeded_dropout(model) == 14
    torch.manual_seed(11)
    ref = wrapped(ids)
    ref.backward()
    want = adapter_grads(model)
    assert len(want) == 28 and got.keys() == want.keys()
    assert_rel_close(loss, ref, 1e-5, "loss")
    for name in want:
        assert_rel_close(got[name], want[name], 1e-5, f"grad of {name}")
