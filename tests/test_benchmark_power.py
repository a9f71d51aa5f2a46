"""benchmarks/power.py without a GPU: energy per call from phases and NVML samples, and its errors."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import power  # noqa: E402


def test_energy_rows_average_the_samples_inside_each_window():
    samples = [power.Sample(t, w, mhz) for t, w, mhz in
               [(0.5, 100.0, 1000.0), (1.0, 600.0, 1500.0), (1.5, 700.0, 1400.0), (2.5, 650.0, 1600.0), (3.5, 50.0, 900.0)]]
    phases = [power.Phase("a", 0.9, 1.6, [700.0, 720.0, 740.0]), power.Phase("b", 2.0, 3.0, [10.0, 30.0])]
    a, b = power.energy_rows(phases, samples)
    assert a == {"name": "a", "us": 720.0, "watts": 650.0, "sm_mhz": 1450.0, "mj": pytest.approx(650.0 * 720.0 / 1e3)}
    assert (b["us"], b["watts"], b["sm_mhz"], b["mj"]) == (20.0, 650.0, 1600.0, pytest.approx(13.0))


def test_a_window_without_samples_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"no power sample inside phase 'short' .*--seconds"):
        power.energy_rows([power.Phase("short", 1.0, 1.01, [5.0])], [power.Sample(0.5, 1.0, 1.0)])


def test_the_sampler_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    with pytest.raises(RuntimeError, match="pip install nvidia-ml-py"):
        power.PowerSampler()


def test_arguments_are_checked_before_any_gpu_work():
    with pytest.raises(SystemExit):
        power.main(["gemms", "--seconds", "0.1"])


def test_a_replay_keeps_the_captured_call_and_its_outputs_alive(monkeypatch):
    """power.py captures every shape's graphs before timing any: the graphs read and write the operands the
    call closes over and the outputs it made, so the replay must keep both from being freed and reused."""
    import gc
    import weakref

    import cuda_graph

    class Graph:
        replays = 0

        def replay(self):
            self.replays += 1

    class Tensorish:  # stands for an operand / an output
        pass

    graph = Graph()
    monkeypatch.setattr(cuda_graph, "capture", lambda step: (graph, step()))
    operand = Tensorish()

    class Call:
        def __init__(self, x):
            self.x = x
            self.made = []

        def __call__(self):
            out = Tensorish()
            self.made.append(weakref.ref(out))
            return out

    call = Call(operand)
    replay = cuda_graph.replay_of_calls(call, 3)
    refs = [weakref.ref(operand), *call.made]
    del operand, call
    gc.collect()
    assert len(refs) == 4 and all(ref() is not None for ref in refs)
    replay()
    assert graph.replays == 1
