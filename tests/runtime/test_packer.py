"""Runtime packer and plan: microbatch layout, block-causal attention, rounds and windows
(distance rule, padding), stage balancing."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from lorafusion_compiler.runtime.jobs import PipelineJob
from lorafusion_compiler.runtime.lazy_step import LazySteps
from lorafusion_compiler.runtime.packer import (
    block_causal_mask,
    pack_microbatch,
    plan_schedule,
)
from lorafusion_compiler.runtime.stages import (
    StageContext,
    StageModule,
    balance_stages,
    decoder_parts,
)
from lorafusion_compiler.runtime.windows import Window, plan_rounds, plan_windows


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
def test_rounds_and_windows_from_scheduler_cover_every_sample_once_in_step_order(seed, stages):
    jobs = _jobs(seed, n_jobs=4)
    plan = plan_schedule(jobs, capacity=64, pad_multiple=8, stages=stages, solver="greedy", time_limit_s=0.0)
    rounds = plan_rounds(plan)
    want = Counter((job.name, t, i) for job in jobs for t in range(job.num_steps) for i in job.step_samples(t))
    assert Counter(item for rnd in rounds for mb in rnd.microbatches for item in mb) == want
    assert [rnd.start for rnd in rounds] == [sum(len(r.microbatches) for r in rounds[:k]) for k in range(len(rounds))]
    round_of = {}
    for r, rnd in enumerate(rounds):  # rounds hold whole steps, each finished in its round
        held = {(job, step) for mb in rnd.microbatches for job, step, _ in mb}
        assert set(rnd.finished) == held and all(round_of.setdefault(key, r) == r for key in held)
    assert set(round_of) == {(job.name, t) for job in jobs for t in range(job.num_steps)}
    for size in (stages, 7, 64, None):
        if size is not None and size < stages:
            continue
        windows = plan_windows(rounds, stages=stages, window_microbatches=size)
        assert [p for w in windows for p in w.positions if p is not None] == list(range(sum(len(r.microbatches) for r in rounds)))
        assert Counter(item for w in windows for mb in w.microbatches for item in mb) == want
        assert windows[-1].end_round == len(rounds)
        for w in windows:
            assert len(w.microbatches) >= stages and (size is None or len(w.microbatches) <= max(size, stages))
            w.check_distance(stages)
            assert all(not mb for mb, p in zip(w.microbatches, w.positions) if p is None)
            for k, mb in enumerate(w.microbatches):
                pack_microbatch(mb, jobs, capacity=64, pad_multiple=8)  # fits the capacity
        finished = [step for w in windows for k in sorted(w.finishes) for step in w.finishes[k]]
        assert sorted(finished) == sorted(round_of)


def test_windowed_plan_drains_less_often_than_rounds():
    """4 jobs, 4 stages: round-synchronous = one fill/drain per round; windows = far fewer."""
    jobs = _jobs(3, n_jobs=4)
    rounds = plan_rounds(plan_schedule(jobs, capacity=64, pad_multiple=8, stages=4, solver="greedy", time_limit_s=0.0))
    synchronous = plan_windows(rounds, stages=4, window_microbatches=None)
    windowed = plan_windows(rounds, stages=4, window_microbatches=64)
    total = sum(len(r.microbatches) for r in rounds)
    assert len(synchronous) == len(rounds) > 2
    assert len(windowed) == -(-total // 64) < len(rounds)
    assert sum(len(w.microbatches) for w in windowed) < sum(len(w.microbatches) for w in synchronous)


def _mb(*items):
    return [tuple(item) for item in items]


# a0 a0+b0 | b1 | a1 | b2: b's steps follow each other directly, a's step 1 comes 2 after step 0
HAND_PLAN = [_mb(("a", 0, 0)), _mb(("a", 0, 1), ("b", 0, 0)), _mb(("b", 1, 1)), _mb(("a", 1, 2)), _mb(("b", 2, 2))]


def test_distance_rule_inserts_exactly_the_needed_padding():
    rounds = plan_rounds([[], *HAND_PLAN, []])  # the scheduler's no-ops are dropped
    assert [(r.start, len(r.microbatches), r.finished) for r in rounds] == [
        (0, 2, [("a", 0), ("b", 0)]), (2, 1, [("b", 1)]), (3, 1, [("a", 1)]), (4, 1, [("b", 2)])]
    (window,) = plan_windows(rounds, stages=4, window_microbatches=64)
    # b1 must sit >= 4 after b0 (index 1): 3 pads; a1 (a0 ends at 1) fits at 6; b2 after b1 (5): 2 pads
    assert window.microbatches == [HAND_PLAN[0], HAND_PLAN[1], [], [], [], HAND_PLAN[2], HAND_PLAN[3], [], [], HAND_PLAN[4]]
    assert window.positions == [0, 1, None, None, None, 2, 3, None, None, 4] and window.padding == 5
    assert window.finishes == {1: [("a", 0), ("b", 0)], 5: [("b", 1)], 6: [("a", 1)], 9: [("b", 2)]}
    assert window.requires == {5: [("b", 0)], 6: [("a", 0)], 9: [("b", 1)]}
    assert window.end_round == 4
    # 2 stages: only b1 comes too early (index 2, b0 ends at 1): one pad
    (two,) = plan_windows(rounds, stages=2, window_microbatches=64)
    assert two.padding == 1 and two.microbatches[2] == [] and two.requires == {3: [("b", 0)], 4: [("a", 0)], 5: [("b", 1)]}


def test_full_window_is_cut_instead_of_padded():
    rounds = plan_rounds(HAND_PLAN)
    windows = plan_windows(rounds, stages=4, window_microbatches=6)
    # rounds 0+1 fill 6 (3 pads); round 2 would be the 7th: the window ends at round 2 and the
    # next one needs no pads for b2 (b1 was applied at the window end), only 2 to reach 4 microbatches
    assert [w.microbatches for w in windows] == [HAND_PLAN[:2] + [[], [], []] + HAND_PLAN[2:3], HAND_PLAN[3:] + [[], []]]
    assert [w.end_round for w in windows] == [2, 4] and [w.padding for w in windows] == [3, 2]
    assert windows[1].requires == {}
    cut = plan_windows(rounds, stages=4, window_microbatches=64, cuts={1, 3})
    assert [w.end_round for w in cut] == [1, 3, 4]


def test_round_longer_than_a_window_is_split_inside():
    plan = [_mb(("a", 0, i), ("b", 0, i)) for i in range(3)] + [_mb(("a", 0, 3))]  # one round of 4 microbatches
    windows = plan_windows(plan_rounds(plan), stages=2, window_microbatches=3)
    assert [w.positions for w in windows] == [[0, 1, 2], [3, None]]
    assert [w.end_round for w in windows] == [None, 1]  # no resume point inside the round
    assert windows[0].finishes == {2: [("b", 0)]} and windows[1].finishes == {0: [("a", 0)]}


def test_plans_breaking_step_order_are_rejected():
    with pytest.raises(ValueError, match="the microbatch at position 0 holds steps 0 and 1 of job 'a'"):
        plan_rounds([[("a", 0, 0), ("a", 1, 1)]])
    with pytest.raises(ValueError, match="job 'a' step 1 starts at position 1, before step 0 ends at position 2"):
        plan_rounds([[("a", 0, 0)], [], [("a", 1, 2)], [("a", 0, 1)]])
    with pytest.raises(ValueError, match=r"window_microbatches=3 must be an integer >= the number of stages \(4\)"):
        plan_windows(plan_rounds(HAND_PLAN), stages=4, window_microbatches=3)


def test_distance_violations_fail_loudly_instead_of_hanging():
    bad = Window(microbatches=HAND_PLAN[:3], positions=[0, 1, 2], finishes={1: [("a", 0), ("b", 0)], 2: [("b", 1)]},
                 requires={2: [("b", 0)]}, end_round=None)
    bad.check_distance(1)
    with pytest.raises(ValueError, match="window microbatch 2 starts step 1 of job 'b' but step 0 ends at microbatch 1: "
                                         "1F1B with 2 stages needs a distance >= 2"):
        bad.check_distance(2)
    # at run time: a stage asked to start b's step 1 before it ran the backward that ends step 0
    job = PipelineJob(name="b", samples=[torch.arange(4)] * 3, global_batch_size=1)
    weight = torch.nn.Parameter(torch.ones(2))
    steps = LazySteps([job], {"b": [weight]}, group=None, stage=0)
    steps.start(bad)
    with pytest.raises(RuntimeError, match="stage 0: window microbatch 2 starts step 1 of job 'b' before this stage ran "
                                           "the backward of step 0's last microbatch"):
        steps.before_forward(2)


def test_lazy_step_clips_by_the_global_norm_like_clip_grad_norm():
    job = PipelineJob(name="a", samples=[torch.arange(4)] * 2, global_batch_size=1, lr=0.1, max_grad_norm=0.5)
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    reference = torch.nn.Parameter(weight.detach().clone())
    window = Window(microbatches=[[("a", 0, 0)], [], [("a", 1, 1)]], positions=[0, None, 1],
                    finishes={0: [("a", 0)], 2: [("a", 1)]}, requires={2: [("a", 0)]}, end_round=1)
    steps = LazySteps([job], {"a": [weight]}, group=None, stage=0)
    opt = torch.optim.AdamW([reference], lr=0.1, weight_decay=job.weight_decay)
    steps.start(window)
    for p in (weight, reference):
        p.grad = torch.tensor([3.0, 4.0, 12.0])
    steps.after_backward(0)
    steps.before_forward(2)
    torch.nn.utils.clip_grad_norm_([reference], 0.5)
    opt.step()
    assert torch.equal(weight, reference) and weight.grad is None and steps.steps_done == {"a": 1}
    weight.grad = torch.tensor([0.1, 0.0, 0.0])
    steps.after_backward(2)
    assert steps.flush() == [("a", 0), ("a", 1)] and steps.steps_done == {"a": 2}


def test_balance_stages_minimises_the_largest_stage():
    assert balance_stages([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balance_stages([1, 1, 1, 1], 2, tail_cost=2) == [(0, 3), (3, 4)]
    assert balance_stages([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    with pytest.raises(ValueError, match="cannot cut 2 decoder layers into 3 stages"):
        balance_stages([1, 1], 3)
