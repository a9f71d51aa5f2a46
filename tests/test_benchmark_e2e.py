"""CPU test of benchmarks/e2e.py's ``--interleave`` bookkeeping (models and GPU calls mocked): every
variant is built and warmed up first, then timed round-robin, and each row's ratio uses the floor."""

import json
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_interleave_builds_all_then_times_round_robin(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import e2e
    import timing

    events = []

    def fake_build(p, variant, layers):
        events.append(("build", variant, p))

        def step(ids):
            assert ids.shape == (2, 8)
            events.append(("step", variant, p))
            time.sleep(0.002)  # host work of the step: reported as host_ms

        return step

    monkeypatch.setattr(e2e, "build_step", fake_build)
    monkeypatch.setattr(e2e, "new_ids", lambda args: torch.zeros(args.tokens // args.seq, args.seq, dtype=torch.long))
    monkeypatch.setattr(timing, "CudaEventTimer", timing.WallTimer)  # no GPU: host clock
    for name, value in (("memory_allocated", lambda: 0), ("max_memory_allocated", lambda: 2**30),
                        ("synchronize", lambda: None), ("reset_peak_memory_stats", lambda: None),
                        ("get_device_name", lambda: "mock")):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--layers", "1", "--tokens", "16", "--seq", "8", "--dropout", "0.1", "0.0",
                                      "--variants", "floor+cg", "ours+cg", "ours+ovl+cg", "--interleave",
                                      "--steps", "4", "--warmup", "2"])
    e2e.main()

    runs = [(None, "floor+cg"), (0.1, "ours+cg"), (0.1, "ours+ovl+cg"), (0.0, "ours+cg"), (0.0, "ours+ovl+cg")]
    builds = [i for i, e in enumerate(events) if e[0] == "build"]
    assert [events[i][1:] for i in builds] == [(v, p) for p, v in runs]
    per_run = {run: sum(1 for e in events if e[0] == "step" and (e[2], e[1]) == run) for run in runs}
    assert per_run == {run: 2 + 1 + 2 + 4 for run in runs}  # warm-up, peak step, timing warm-up, timed rounds
    timed = events[builds[-1] + 4:]  # after the last run's warm-up and peak step: round-robin, shuffled each round
    rounds = [[(e[2], e[1]) for e in timed[i:i + 5]] for i in range(0, len(timed), 5)]
    assert len(rounds) == 2 + 4 and all(sorted(r, key=str) == sorted(runs, key=str) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # no fixed neighbour order (timing.interleaved_ms)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["p"], r["variant"]) for r in rows] == runs
    assert rows[0]["floor_ratio"] == 1.0 and all(r["peak_gib"] == 1.0 for r in rows)
    for r in rows[1:]:
        assert r["floor_ratio"] == rows[0]["ms"] / r["ms"]
    assert all(2.0 <= r["host_ms"] <= r["ms"] for r in rows)  # the step's host time, within its wall time


def test_cast_variant_records_its_steps_with_the_gemms_casting_fp32_operands(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import e2e
    from lorafusion_compiler.codegen.gluon import lora_gemm

    seen = []
    monkeypatch.setattr(e2e, "make_step", lambda *a, **k: lambda ids: seen.append(lora_gemm.R_FP32_MAX_RANK))
    class Base(torch.nn.Linear):
        def get_input_embeddings(self):
            return self
    monkeypatch.setattr(e2e, "build_base", lambda layers: Base(4, 4))
    monkeypatch.setattr(e2e, "with_lora", lambda model, **k: model)
    monkeypatch.setattr(torch, "compile", lambda model, **k: model)
    default = lora_gemm.R_FP32_MAX_RANK
    assert default > 0
    e2e.build_step(0.1, "ours+cast+cg", 1)(None)
    e2e.build_step(0.1, "ours+cg", 1)(None)
    assert seen == [0, default] and lora_gemm.R_FP32_MAX_RANK == default
