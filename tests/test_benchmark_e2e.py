"""CPU tests of benchmarks/e2e.py (models and GPU calls mocked): the ``--interleave`` and ``--sustained``
bookkeeping (every variant built and warmed up first, then timed round-robin or in phases, each row's ratio
against the floor), and the backend options each variant name sets."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _without_gpu(monkeypatch):
    """torch.cuda's memory, sync and name calls answered on the host (1 GiB peak)."""
    for name, value in (("memory_allocated", lambda: 0), ("max_memory_allocated", lambda: 2**30),
                        ("synchronize", lambda: None), ("reset_peak_memory_stats", lambda: None),
                        ("get_device_name", lambda: "mock")):
        monkeypatch.setattr(torch.cuda, name, value)


def _tiny_models(monkeypatch, e2e):
    """``e2e.build_step``'s models replaced by one Linear (its own input embeddings), PEFT wrapping a no-op."""
    class Base(torch.nn.Linear):
        def get_input_embeddings(self):
            return self
    monkeypatch.setattr(e2e, "build_base", lambda layers: Base(4, 4))
    monkeypatch.setattr(e2e, "with_lora", lambda model, **k: model)


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
    _without_gpu(monkeypatch)
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
    _tiny_models(monkeypatch, e2e)
    monkeypatch.setattr(torch, "compile", lambda model, **k: model)
    default = lora_gemm.R_FP32_MAX_RANK
    assert default > 0
    e2e.build_step(0.1, "ours+cast+cg", 1)(None)
    e2e.build_step(0.1, "ours+cg", 1)(None)
    assert seen == [0, default] and lora_gemm.R_FP32_MAX_RANK == default


def test_sustained_times_each_variant_in_phases_and_takes_the_median_round(monkeypatch, capsys):
    """``--sustained S --rounds R``: all variants built first, then R rounds in which every variant runs
    back to back for S seconds (``power.run_phase``); a row's ms is the median of its phase medians."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import e2e
    import power

    monkeypatch.setattr(e2e, "build_step", lambda p, variant, layers: lambda ids: None)
    monkeypatch.setattr(e2e, "new_ids", lambda args: torch.zeros(1, 8, dtype=torch.long))
    _without_gpu(monkeypatch)
    phase_us = {"(None, 'floor+cg')": [70e3, 71e3, 69e3], "(0.0, 'ours+cg')": [74e3, 80e3, 73e3]}
    calls = []

    def fake_phase(name, call, *, seconds, sync_every):
        assert seconds == 1.5 and sync_every == 3
        call()
        calls.append(name)
        us = phase_us[name][sum(1 for c in calls if c == name) - 1]
        return power.Phase(name, 0.0, 1.0, [us, us + 10.0, us - 10.0])

    monkeypatch.setattr(power, "run_phase", fake_phase)
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--layers", "1", "--tokens", "8", "--seq", "8", "--dropout", "0.0",
                                      "--variants", "floor+cg", "ours+cg", "--sustained", "1.5", "--rounds", "3"])
    e2e.main()
    assert calls == list(phase_us) * 3  # round after round, every variant once per round
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["ms"] for r in rows] == [70.0, 74.0]
    assert rows[1]["floor_ratio"] == 70.0 / 74.0


def test_sustained_rejects_a_phase_too_short_to_sample(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import e2e

    monkeypatch.setattr(sys, "argv", ["e2e.py", "--sustained", "0.1"])
    with pytest.raises(SystemExit):
        e2e.main()


def test_variant_names_set_the_backend_options(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import e2e

    seen = []

    monkeypatch.setattr(e2e, "make_step", lambda *a, **k: None)
    _tiny_models(monkeypatch, e2e)
    monkeypatch.setattr(torch, "compile", lambda model, **k: seen.append(k.get("options")) or model)
    for variant in ("ours+cg", "ours+noshare+gluon-gemms+cg", "ours+gluon+ovl", "ours+triton+cg"):
        e2e.build_step(0.0, variant, 1)
    assert [(o["kernels"], o["share_inputs"], o["overlap_backward"], o["cudagraphs"]) for o in seen] == [
        ("auto", True, False, True), ("gluon-gemms", False, False, True), ("gluon", True, True, False),
        ("triton", True, False, True)]
