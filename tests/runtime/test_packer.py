"""Runtime packer: microbatch layout, block-causal attention, rounds, stage balancing."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from lorafusion_compiler.runtime.jobs import PipelineJob
from lorafusion_compiler.runtime.packer import (
    block_causal_mask,
    pack_microbatch,
    plan_rounds,
    plan_schedule,
)
from lorafusion_compiler.runtime.stages import (
    StageContext,
    StageModule,
    balance_stages,
    decoder_parts,
)


def _jobs(seed: int = 0, n_jobs: int = 3) -> list[PipelineJob]:
    rng = random.Random(seed)
    jobs = []
    for j in range(n_jobs):
        samples = [torch.randint(0, 256, (rng.randint(2, 30),), dtype=torch.int64) for _ in range(rng.randint(3, 12))]
        jobs.append(PipelineJob(name=f"job{j}", samples=samples, global_batch_size=rng.randint(1, 4), epochs=rng.randint(1, 2)))
    return jobs


def test_layout_segments_positions_labels_weights():
    jobs = _jobs()
    items = [("job2", 0, i) for i in jobs[2].step_samples(0)] + [("job0", 0, 0)]
    mb = pack_microbatch(items, jobs, capacity=256, pad_multiple=16)
    assert mb.input_ids.shape == (1, 256) and mb.labels.shape == (1, 256)
    table = mb.routing.adapter_rows.tolist()
    assert table[1] == [0, 0]  # job1 absent
    start0, count0 = table[0]
    start2, count2 = table[2]
    assert start0 == 0 and count0 == jobs[0].lengths[0]
    assert start2 % 16 == 0 and start2 >= count0 and count2 == sum(jobs[2].lengths[i] for i in jobs[2].step_samples(0))
    owner = mb.token_job[0]
    assert (owner[start0 : start0 + count0] == 0).all() and (owner[start2 : start2 + count2] == 2).all()
    assert int((owner >= 0).sum()) == count0 + count2
    # job 2's samples back to back, positions restart, labels = next token inside the sample
    row = start2
    for i in jobs[2].step_samples(0):
        s = jobs[2].samples[i]
        n = s.numel()
        assert torch.equal(mb.input_ids[0, row : row + n], s)
        assert torch.equal(mb.position_ids[0, row : row + n], torch.arange(n))
        assert torch.equal(mb.labels[0, row : row + n - 1], s[1:]) and mb.labels[0, row + n - 1] == -100
        assert len(set(mb.sample_ids[0, row : row + n].tolist())) == 1
        row += n
    assert (mb.labels[0][owner < 0] == -100).all() and (mb.weights[0][owner < 0] == 0).all()
    # the step's weights sum to 1 (mean token loss), here the whole step is in this microbatch
    assert float(mb.weights[0, start2 : start2 + count2].sum()) == pytest.approx(1.0, rel=1e-6)


def test_capacity_overflow_is_an_error():
    jobs = _jobs()
    items = [("job0", 0, i) for i in jobs[0].step_samples(0)]
    with pytest.raises(ValueError, match="more than capacity=8"):
        pack_microbatch(items, jobs, capacity=8, pad_multiple=8)


def test_block_causal_mask_blocks_other_samples():
    ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    mask = block_causal_mask(ids, torch.float32)[0, 0]
    allowed = mask == 0
    for q in range(7):
        for k in range(7):
            assert bool(allowed[q, k]) == (k <= q and int(ids[0, q]) == int(ids[0, k]))
    assert allowed.any(dim=1).all()  # no fully masked row (no NaN softmax)


def test_packed_forward_equals_each_sample_alone():
    """Block-causal mask + restarting positions: a packed row's logits equal its sample run alone."""
    from lorafusion_compiler.product.tiny_llama import TinyLlamaConfig, build_tiny_llama
    from lorafusion_compiler.runtime.pipeline import build_multi_adapter_model

    cfg = TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_positions=64)
    jobs = [PipelineJob(name="ja", samples=[torch.randint(0, 256, (n,)) for n in (5, 9, 3)], global_batch_size=3, rank=2,
                        target_modules=("q_proj", "v_proj")),
            PipelineJob(name="jb", samples=[torch.randint(0, 256, (n,)) for n in (7, 4)], global_batch_size=2, rank=4,
                        target_modules=("q_proj", "v_proj"))]
    peft_model, _ = build_multi_adapter_model(build_tiny_llama(cfg, seed=3), jobs)
    with torch.no_grad():
        for p in peft_model.parameters():  # non-zero B so the adapters matter
            if p.requires_grad:
                p.normal_(0, 0.1)
    peft_model.eval()
    from peft import get_peft_model  # plain PEFT copy (not routed) as the reference

    reference = get_peft_model(build_tiny_llama(cfg, seed=3), jobs[0].lora_config(), adapter_name="ja")
    reference.add_adapter("jb", jobs[1].lora_config())
    reference.load_state_dict(peft_model.state_dict())
    reference.eval()
    parts = decoder_parts(peft_model)
    stage = StageModule(parts, 0, len(parts.layers), first=True, last=True)
    items = [("jb", 0, 0), ("ja", 0, 0), ("ja", 0, 1), ("jb", 0, 1), ("ja", 0, 2)]
    mb = pack_microbatch(items, jobs, capacity=64, pad_multiple=8)
    stage.feed([StageContext.from_microbatch(mb, device=torch.device("cpu"))])
    with torch.no_grad():
        logits = stage(mb.input_ids)[0]
        for j, job in enumerate(jobs):
            start = int(mb.routing.adapter_rows[j, 0])
            reference.set_adapter(job.name)
            for sample in job.samples:
                n = sample.numel()
                alone = reference(input_ids=sample[None]).logits[0]
                torch.testing.assert_close(logits[start : start + n], alone, atol=1e-5, rtol=1e-5)
                start += n


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_rounds_from_scheduler_cover_every_sample_once_in_step_order(seed, stages):
    jobs = _jobs(seed, n_jobs=4)
    plan = plan_schedule(jobs, capacity=64, pad_multiple=8, stages=stages, solver="greedy", time_limit_s=0.0)
    rounds = plan_rounds(plan, min_microbatches=stages)
    got = Counter(item for rnd in rounds for mb in rnd.microbatches for item in mb)
    want = Counter((job.name, t, i) for job in jobs for t in range(job.num_steps) for i in job.step_samples(t))
    assert got == want
    finished_in: dict[tuple[str, int], int] = {}
    for r, rnd in enumerate(rounds):
        assert len(rnd.microbatches) >= stages
        for key in rnd.finished:
            assert key not in finished_in
            finished_in[key] = r
        steps = {}
        for mb in rnd.microbatches:
            pack_microbatch(mb, jobs, capacity=64, pad_multiple=8)  # fits the capacity
            for job, step, _ in mb:
                assert steps.setdefault(job, step) == step, f"round {r} holds two steps of {job}"
    assert set(finished_in) == {(job.name, t) for job in jobs for t in range(job.num_steps)}
    for r, rnd in enumerate(rounds):  # step t starts only after step t - 1 finished in an earlier round
        for mb in rnd.microbatches:
            for job, step, _ in mb:
                assert finished_in[(job, step)] >= r
                if step > 0:
                    assert finished_in[(job, step - 1)] < r


def test_rounds_split_a_microbatch_holding_two_steps_of_one_job():
    plan = [[("a", 0, 0), ("a", 1, 1), ("b", 0, 0)], [("a", 1, 2)]]
    rounds = plan_rounds(plan)
    assert [r.microbatches for r in rounds] == [[[("a", 0, 0), ("b", 0, 0)]], [[("a", 1, 1)], [("a", 1, 2)]]]
    assert [r.finished for r in rounds] == [[("a", 0), ("b", 0)], [("a", 1)]]


def test_balance_stages_minimises_the_largest_stage():
    assert balance_stages([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balance_stages([1, 1, 1, 1], 2, tail_cost=2) == [(0, 3), (3, 4)]
    assert balance_stages([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    with pytest.raises(ValueError, match="cannot cut 2 decoder layers into 3 stages"):
        balance_stages([1, 1], 3)
