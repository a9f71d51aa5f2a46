"""1-stage pipeline (no torch.distributed): each job's adapter equals training it alone.

Tests that compare with a CPU reference or bitwise between runs pin ``device="cpu"``, so they check
the same thing on a GPU machine; the CUDA path is tested in test_pipeline_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafusion_compiler.product.text_data import byte_tokens, load_text
from lorafusion_compiler.product.tiny_llama import TinyLlamaConfig, build_tiny_llama
from lorafusion_compiler.runtime.jobs import PipelineJob, init_adapter_weights
from lorafusion_compiler.runtime.pipeline import pipeline

TINY = TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_positions=128)
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
CAPACITY, PAD = 128, 8
GREEDY = {"solver": "greedy", "time_limit_s": 0.0}


def make_samples(text: str, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` byte-token windows of random lengths 6..40 from a shipped text."""
    tokens = byte_tokens(load_text(text))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(6, 41, (1,), generator=g))
        start = int(torch.randint(0, tokens.numel() - n, (1,), generator=g))
        out.append(tokens[start : start + n].clone())
    return out


def make_jobs(steps: int = 3) -> list[PipelineJob]:
    """Two jobs with different ranks, batch sizes, lrs and data."""
    return [
        PipelineJob(name="tales", samples=make_samples("tales", 12, 1), global_batch_size=4, rank=4, alpha=8, lr=5e-3,
                    steps=steps, target_modules=TARGETS, max_grad_norm=0.05, init_seed=11),
        PipelineJob(name="recipes", samples=make_samples("recipes", 9, 2), global_batch_size=3, rank=8, alpha=8, lr=3e-3,
                    steps=steps, target_modules=TARGETS, max_grad_norm=None, init_seed=12, weight_decay=0.01),
    ]


def train_alone(job: PipelineJob, steps: int) -> dict[str, torch.Tensor]:
    """Reference: the job alone, plain PEFT forward per sample, mean token loss per step."""
    from peft import get_peft_model, get_peft_model_state_dict

    model = get_peft_model(build_tiny_llama(TINY, seed=0), job.lora_config(), adapter_name=job.name)
    init_adapter_weights(model, job.name, job.init_seed)
    model.train()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=job.lr, betas=job.betas, weight_decay=job.weight_decay)
    for step in range(steps):
        total = job.step_target_tokens(step)
        for i in job.step_samples(step):
            ids = job.samples[i][None]
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum") / total
            loss.backward()
        if job.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, job.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=job.name).items()}


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def assert_states_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=atol, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_single_stage_matches_training_each_job_alone(tmp_path):
    steps = 3
    jobs = make_jobs(steps)
    result = pipeline(build_tiny_llama(TINY, seed=0), jobs, capacity=CAPACITY, pad_multiple=PAD, out_dir=tmp_path,
                      schedule_options=GREEDY, progress=False, device="cpu")
    assert result.finished and result.steps_done == {"tales": steps, "recipes": steps}
    assert all(len(v) == steps and all(x > 0 for x in v) for v in result.losses.values())
    for job in make_jobs(steps):
        want = train_alone(job, steps)
        got = adapter_state(result.model, job.name)
        assert any((v != 0).any() for k, v in got.items() if "lora_B" in k), "B never trained"
        assert_states_close(got, want)
    import json

    records = [json.loads(line) for line in (tmp_path / "metrics-rank0.jsonl").read_text().splitlines()]
    stage_records = [r for r in records if r["kind"] == "stage"]
    assert len(stage_records) == result.windows == result.total_rounds  # one stage: one window per round
    assert [r["next_round"] for r in stage_records] == list(range(1, result.total_rounds + 1))
    assert all(0.0 <= r["bubble_ratio"] <= 1.0 and r["busy_s"] > 0 and r["padding"] == 0 for r in stage_records)
    for name, losses in result.losses.items():
        logged = [r for r in records if r["kind"] == "job" and r["job"] == name]
        assert [r["step"] for r in logged] == list(range(steps)) and [r["loss"] for r in logged] == losses
        assert all(r["tokens_per_s"] > 0 for r in logged)
    last_job_records = {r["job"]: r for r in records if r["kind"] == "job"}
    assert sum(r["tokens"] for r in stage_records) == sum(r["tokens"] for r in last_job_records.values()) > 0
    assert all(r["wall_s"] >= r["busy_s"] for r in stage_records)


def test_kept_gradients_train_the_same_adapters(monkeypatch):
    """LazySteps(keep_grads=True) — what CUDA graphs use: gradients allocated up front, added
    into in place and zeroed after each step — trains exactly what the default path trains."""
    import importlib

    from lorafusion_compiler.runtime.lazy_step import LazySteps

    pipeline_module = importlib.import_module("lorafusion_compiler.runtime.pipeline")  # the package exports the function

    kept = []

    class KeptSteps(LazySteps):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "keep_grads": True})
            kept.append(self)

    def run():
        return pipeline(build_tiny_llama(TINY, seed=0), make_jobs(3), capacity=CAPACITY, pad_multiple=PAD,
                        schedule_options=GREEDY, progress=False, device="cpu")

    plain = run()
    monkeypatch.setattr(pipeline_module, "LazySteps", KeptSteps)
    with_kept = run()
    assert len(kept) == 1
    params = [p for ps in kept[0].params.values() for p in ps]
    assert params and all(p.grad is not None and not p.grad.any() for p in params)  # allocated, zeroed by the last step
    assert with_kept.losses == plain.losses
    for job in make_jobs(3):
        a, b = adapter_state(plain.model, job.name), adapter_state(with_kept.model, job.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_stage_windows_do_not_change_the_result():
    """Rounds grouped into windows (lazy steps mid-window) or cut inside == one round per window, bitwise."""
    def run(**kwargs):
        jobs = make_jobs(3)
        for job in jobs:
            job.dropout = 0.1  # the RNG is seeded per microbatch, not per window
        return pipeline(build_tiny_llama(TINY, seed=0), jobs, capacity=CAPACITY, pad_multiple=PAD, schedule_options=GREEDY,
                        progress=False, device="cpu", **kwargs)

    rounds = run()
    assert rounds.windows == rounds.total_rounds == 3  # rounds of 2 microbatches
    for size, count in ((5, 2), (1, 6)):
        windows = run(window_microbatches=size)
        assert windows.windows == count and windows.losses == rounds.losses
        for job in make_jobs(3):
            a, b = adapter_state(rounds.model, job.name), adapter_state(windows.model, job.name)
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_stage_loss_equals_mean_token_loss_of_the_step():
    """The logged loss of step 0 is the untrained model's mean token loss over the step's samples."""
    jobs = make_jobs(1)
    model = build_tiny_llama(TINY, seed=0)
    with torch.no_grad():
        want = {}
        for job in jobs:
            losses = [F.cross_entropy(model(input_ids=job.samples[i][None]).logits[0, :-1], job.samples[i][1:], reduction="sum")
                      for i in job.step_samples(0)]
            want[job.name] = float(sum(losses) / job.step_target_tokens(0))
    result = pipeline(model, jobs, capacity=CAPACITY, pad_multiple=PAD, schedule_options=GREEDY, progress=False)
    for job in jobs:  # B = 0 at init: the adapter does not change the first forward
        assert result.losses[job.name][0] == pytest.approx(want[job.name], rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"global_batch_size": 0}, "global_batch_size of job 'x' must be a positive integer, got 0"),
        ({"samples": [torch.tensor([1])]}, "has 1 token(s)"),
        ({"samples": [torch.ones(3, dtype=torch.int32)]}, "samples must be 1-D int64 token tensors"),
        ({"dropout": 1.5}, "dropout of job 'x' is 1.5"),
        ({"lr": -1.0}, "lr of job 'x' is -1.0"),
        ({"name": "a/b"}, "names a folder"),
    ],
)
def test_job_validation_names_the_bad_value(kwargs, message):
    base = {"name": "x", "samples": [torch.arange(5)], "global_batch_size": 1}
    with pytest.raises(ValueError) as err:
        PipelineJob(**{**base, **kwargs})
    assert message in str(err.value)


def test_pipeline_rejects_bad_settings(tmp_path):
    jobs = make_jobs(1)
    with pytest.raises(ValueError, match="more than capacity=16"):
        pipeline(build_tiny_llama(TINY), jobs, capacity=16, pad_multiple=8, progress=False)
    with pytest.raises(ValueError, match="not a multiple of pad_multiple=8"):
        pipeline(build_tiny_llama(TINY), jobs, capacity=100, pad_multiple=8, progress=False)
    with pytest.raises(ValueError, match="window_microbatches=0 must be a positive integer or None"):
        pipeline(build_tiny_llama(TINY), jobs, window_microbatches=0, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every=True must be a positive integer or None"):
        pipeline(build_tiny_llama(TINY), jobs, checkpoint_every=True, progress=False)
    with pytest.raises(ValueError, match="cudagraphs=True needs a compiled stage on CUDA"):
        pipeline(build_tiny_llama(TINY), jobs, cudagraphs=True, compile=False, progress=False)
    with pytest.raises(ValueError, match="cudagraphs='yes' must be a bool or None"):
        pipeline(build_tiny_llama(TINY), jobs, cudagraphs="yes", progress=False)
    other = PipelineJob(name="other", samples=[torch.arange(5)], global_batch_size=1, target_modules=("q_proj",))
    with pytest.raises(ValueError, match="must wrap the same modules"):
        pipeline(build_tiny_llama(TINY), [jobs[0], other], progress=False)


def test_compiled_stage_matches_eager():
    """Stage compiled with backend="lorafusion" (CPU: the op's torch kernels) trains the same adapters."""
    steps = 2
    from torch._dynamo.utils import counters

    eager = pipeline(build_tiny_llama(TINY, seed=0), make_jobs(steps), capacity=CAPACITY, pad_multiple=PAD,
                     schedule_options=GREEDY, progress=False, compile=False)
    counters.clear()
    compiled = pipeline(build_tiny_llama(TINY, seed=0), make_jobs(steps), capacity=CAPACITY, pad_multiple=PAD,
                        schedule_options=GREEDY, progress=False, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    for job in make_jobs(steps):
        assert_states_close(adapter_state(compiled.model, job.name), adapter_state(eager.model, job.name))
        assert compiled.losses[job.name] == pytest.approx(eager.losses[job.name], rel=1e-5)


def test_job_samples_from_a_dataset_or_a_callable():
    from torch.utils.data import Dataset

    class Windows(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.arange(i + 2)

    job = PipelineJob(name="d", samples=Windows(), global_batch_size=2)
    assert job.lengths == (2, 3, 4) and job.num_steps == 2 and job.step_target_tokens(1) == 3
    job = PipelineJob(name="c", samples=lambda: (torch.arange(5) for _ in range(3)), global_batch_size=2, epochs=2)
    assert job.lengths == (5, 5, 5) and job.num_steps == 4 and list(job.step_samples(3)) == [2]
