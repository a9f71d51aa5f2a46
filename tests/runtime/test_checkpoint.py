"""Checkpoints: PEFT-format adapters that reload exactly; interrupt + resume == uninterrupted."""

from __future__ import annotations

import json

import pytest
import torch
from test_pipeline_single import CAPACITY, GREEDY, PAD, TINY, adapter_state, make_jobs

from lorafusion_compiler.product.tiny_llama import build_tiny_llama
from lorafusion_compiler.runtime.pipeline import pipeline

STEPS = 3


def _dropout_jobs():
    jobs = make_jobs(STEPS)
    for job in jobs:  # dropout makes the run depend on the RNG state: resume must restore it
        job.dropout = 0.1
    return jobs


def _run(out_dir, jobs=None, **kwargs):
    return pipeline(build_tiny_llama(TINY, seed=0), jobs or _dropout_jobs(), capacity=CAPACITY, pad_multiple=PAD,
                    out_dir=out_dir, schedule_options=GREEDY, progress=False, device="cpu", **kwargs)


def _peft_reload(folder, name):
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(build_tiny_llama(TINY, seed=0), str(folder), adapter_name=name)
    return model, {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def test_checkpoint_is_peft_format_and_reloads_exactly(tmp_path):
    result = _run(tmp_path, jobs=make_jobs(STEPS))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["next_round"] == result.total_rounds
    for job in make_jobs(STEPS):
        folder = tmp_path / job.name / f"step-{STEPS}"
        assert state["jobs"][job.name] == {"steps_done": STEPS, "dir": f"{job.name}/step-{STEPS}"}
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == job.rank and config["lora_alpha"] == job.alpha and set(config["target_modules"]) == set(job.target_modules)
        assert (folder / "optimizer-stage0.pt").exists()
        _, reloaded = _peft_reload(folder, job.name)
        trained = adapter_state(result.model, job.name)
        assert reloaded.keys() == trained.keys()
        for key in trained:
            assert torch.equal(reloaded[key], trained[key]), key
        # the reloaded model computes with the trained adapter (B is non-zero after training)
        assert any(float(v.abs().max()) > 0 for k, v in reloaded.items() if "lora_B" in k)
    assert not list(tmp_path.rglob(".*tmp*")), "temporary files left behind"


def test_interrupted_then_resumed_equals_uninterrupted_bitwise(tmp_path):
    full = _run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="injected failure on rank 0 after round 1"):
        _run(tmp_path / "cut", fail_at_round={0: 1})
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["next_round"] == 1  # round 1 died before its checkpoint
    stale = tmp_path / "cut" / "tales" / "step-2"  # as if a crash hit after writing step 2, before its commit
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"garbage")
    (tmp_path / "cut" / "tales" / ".tmp-step-7").mkdir()
    resumed = _run(tmp_path / "cut", resume=True)
    assert not (tmp_path / "cut" / "tales" / ".tmp-step-7").exists()
    rewritten, want = _peft_reload(stale, "tales")[1], _peft_reload(tmp_path / "full" / "tales" / "step-2", "tales")[1]
    assert all(torch.equal(rewritten[k], want[k]) for k in want)  # the stale step-2 was replaced by the real one
    assert resumed.steps_done == full.steps_done == {"tales": STEPS, "recipes": STEPS}
    assert resumed.losses["tales"] == full.losses["tales"][1:]  # rounds 1.. re-run with the same RNG
    for job in _dropout_jobs():
        a, b = adapter_state(full.model, job.name), adapter_state(resumed.model, job.name)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        _, from_disk = _peft_reload(tmp_path / "cut" / job.name / f"step-{STEPS}", job.name)
        assert all(torch.equal(from_disk[k], a[k]) for k in a)


def test_max_rounds_then_resume_with_sparse_checkpoints(tmp_path):
    full = _run(tmp_path / "full", checkpoint_every=2)
    first = _run(tmp_path / "part", max_rounds=2, checkpoint_every=2)
    assert not first.finished and first.next_round == 2
    second = _run(tmp_path / "part", resume=True, checkpoint_every=2)
    assert second.finished
    for job in _dropout_jobs():
        a, b = adapter_state(full.model, job.name), adapter_state(second.model, job.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_checkpoint_needs_resume_and_matching_jobs(tmp_path):
    _run(tmp_path, max_rounds=1)
    with pytest.raises(ValueError, match="already holds a checkpoint; pass resume=True"):
        _run(tmp_path)
    other = make_jobs(STEPS)[:1]
    with pytest.raises(ValueError, match="was planned for jobs"):
        _run(tmp_path, jobs=other, resume=True)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        pipeline(build_tiny_llama(TINY), make_jobs(1), resume=True, progress=False)
