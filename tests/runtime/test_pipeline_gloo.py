"""2 ranks (gloo, CPU), windowed 1F1B with lazy optimizer steps: adapters equal training each
job alone; checkpoints reload in PEFT; kill + resume across other window boundaries gives
bitwise the same adapters; a failing rank stops every rank (no hang)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time

import pytest
import torch
from test_pipeline_single import (
    CAPACITY,
    GREEDY,
    PAD,
    TINY,
    assert_states_close,
    make_jobs,
    train_alone,
)

WORLD = 2
STEPS = 3
TIMEOUT_S = 60


def _worker(rank: int, port: int, out_dir: str, results, kwargs: dict) -> None:
    hang_s = kwargs.pop("hang_after_error_s", 0)
    dropout = kwargs.pop("job_dropout", 0.0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.pipelining import Schedule1F1B

    from lorafusion_compiler.product.tiny_llama import build_tiny_llama
    from lorafusion_compiler.runtime.pipeline import pipeline

    drains = []
    step_microbatches = Schedule1F1B._step_microbatches

    def counted(self, *args, **kw):  # one call = one pipeline fill + drain
        drains.append(self._n_microbatches)
        return step_microbatches(self, *args, **kw)

    Schedule1F1B._step_microbatches = counted
    try:
        kwargs = {"capacity": CAPACITY, "pad_multiple": PAD, **kwargs}
        jobs = make_jobs(STEPS)
        for job in jobs:
            job.dropout = dropout
        res = pipeline(build_tiny_llama(TINY, seed=0), jobs, out_dir=out_dir, schedule_options=GREEDY,
                       progress=False, timeout_s=TIMEOUT_S, device="cpu", **kwargs)
        results.put((rank, "ok", {"steps_done": res.steps_done, "bubble": res.bubble_ratio, "losses": res.losses, "stage_layers": res.stage_layers,
                                  "next_round": res.next_round, "total_rounds": res.total_rounds, "drains": drains,
                                  "windows": res.windows, "padding": res.padding_microbatches}))
        dist.destroy_process_group()
    except BaseException as error:
        results.put((rank, "error", f"{type(error).__name__}: {error}"))
        time.sleep(hang_s)  # a failed rank that does not exit (sockets stay open, like a stuck NCCL rank)
        raise


def run_ranks(out_dir, *, timeout_s: float = TIMEOUT_S, **kwargs) -> tuple[dict, dict, float, dict]:
    """Start WORLD worker processes; return ({rank: (status, payload)}, {rank: exit code},
    seconds until all exited (or were killed at ``timeout_s``), {rank: seconds until it exited})."""
    from lorafusion_compiler.runtime.distributed import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    start = time.monotonic()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out_dir), results, kwargs)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got: dict[int, tuple] = {}
    exited: dict[int, float] = {}
    try:
        while time.monotonic() - start < timeout_s:
            try:
                rank, status, payload = results.get(timeout=0.2)
                got[rank] = (status, payload)
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in exited and not p.is_alive():
                    exited[r] = time.monotonic() - start
            if len(exited) == WORLD:
                break
    finally:
        for p in procs:  # never leave a hung worker behind
            if p.is_alive():
                p.kill()
            p.join(5)
    while True:
        try:
            rank, status, payload = results.get(timeout=0.2)
            got[rank] = (status, payload)
        except queue.Empty:
            break
    return got, {r: p.exitcode for r, p in enumerate(procs)}, time.monotonic() - start, exited


def load_adapter(folder, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name`` from a checkpoint folder through ``peft.PeftModel.from_pretrained``."""
    from peft import PeftModel, get_peft_model_state_dict

    from lorafusion_compiler.product.tiny_llama import build_tiny_llama

    model = PeftModel.from_pretrained(build_tiny_llama(TINY, seed=0), str(folder), adapter_name=name)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def test_two_ranks_match_training_alone_and_reload_in_peft(tmp_path):
    # capacity 64: 12 microbatches in 4 rounds, run as ONE window (one fill, one drain): steps
    # 0 and 1 of both jobs are applied lazily mid-window, between other microbatches
    got, codes, seconds, _ = run_ranks(tmp_path, capacity=64)
    assert codes == {0: 0, 1: 0}, (got, codes)
    assert got[0][0] == "ok" and got[1][0] == "ok", got
    assert got[0][1]["stage_layers"] == [(0, 1), (1, 2)]
    assert got[0][1]["steps_done"] == {"tales": STEPS, "recipes": STEPS} and got[0][1]["total_rounds"] == 4
    for r in range(WORLD):  # fewer drains than rounds: the round-synchronous runtime drained 4 times
        assert got[r][1]["windows"] == 1 and got[r][1]["drains"] == [12] and got[r][1]["padding"] == 0
    assert all(0.0 < got[r][1]["bubble"] < 1.0 for r in range(WORLD))
    assert got[0][1]["losses"] == got[1][1]["losses"]  # losses are all-reduced from the last stage
    for job in make_jobs(STEPS):
        assert_states_close(load_adapter(tmp_path / job.name / f"step-{STEPS}", job.name), train_alone(job, STEPS))
    assert seconds < TIMEOUT_S


def test_two_ranks_interrupted_then_resumed_equal_uninterrupted(tmp_path):
    """Bitwise, with dropout: uninterrupted in windows of <= 3 (one cut inside a round) vs
    2 rounds in one window + resume with the other 2 rounds in one window."""
    common = {"capacity": 64, "job_dropout": 0.1}
    full, codes, _, _ = run_ranks(tmp_path / "full", window_microbatches=3, **common)
    assert codes == {0: 0, 1: 0}, full
    assert full[0][1]["drains"] == [3, 2, 3, 2, 2]
    part, codes, _, _ = run_ranks(tmp_path / "resumed", max_rounds=2, **common)
    assert codes == {0: 0, 1: 0}, part
    assert part[0][1]["next_round"] == 2 < part[0][1]["total_rounds"] and part[0][1]["drains"] == [5]
    rest, codes, _, _ = run_ranks(tmp_path / "resumed", resume=True, **common)
    assert codes == {0: 0, 1: 0}, rest
    assert rest[0][1]["drains"] == [7] and rest[0][1]["steps_done"] == full[0][1]["steps_done"]
    for name, losses in full[0][1]["losses"].items():
        assert part[0][1]["losses"][name] + rest[0][1]["losses"][name] == losses
    for job in make_jobs(STEPS):
        a = load_adapter(tmp_path / "full" / job.name / f"step-{STEPS}", job.name)
        b = load_adapter(tmp_path / "resumed" / job.name / f"step-{STEPS}", job.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("failing", [1, 0])
def test_failing_rank_stops_every_rank_with_its_error(tmp_path, failing):
    got, codes, seconds, _ = run_ranks(tmp_path, fail_at_round={failing: 1}, timeout_s=TIMEOUT_S)
    other = 1 - failing
    assert seconds < 45, f"ranks took {seconds:.1f} s to stop"
    assert codes[0] not in (0, None) and codes[1] not in (0, None), (codes, got)
    assert got[failing] == ("error", f"RuntimeError: injected failure on rank {failing} after round 1")
    status, message = got[other]
    assert status == "error" and message == f"RemoteRankError: rank {failing}: RuntimeError: injected failure on rank {failing} after round 1"


def test_peer_stuck_after_failure_does_not_hang_the_others(tmp_path):
    """Rank 1 fails and then hangs with its connections open: rank 0's watchdog must end it."""
    got, codes, _, exited = run_ranks(tmp_path, fail_at_round={1: 1}, hang_after_error_s=30, failure_grace_s=2.0, timeout_s=25)
    assert got[1] == ("error", "RuntimeError: injected failure on rank 1 after round 1")
    assert codes[0] == 1 and 0 in exited and exited[0] < 22, (codes, exited, got)  # rank 0 ended itself
    assert 1 not in exited or exited[1] > exited[0]  # ... while rank 1 was still hanging
