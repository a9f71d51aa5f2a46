"""GPU checks of the multi-adapter kernels (bf16 vs float64 through the op, CUDA graphs).

The checks live in ``benchmarks/multi.py`` (run there by ``--check`` together with the
benchmark); these tests run the same functions under pytest when a CUDA GPU is present.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bench():
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if str(folder) not in sys.path:  # the script imports its sibling cuda_graph.py
        sys.path.insert(0, str(folder))
    path = folder / "multi.py"
    spec = importlib.util.spec_from_file_location("lorafusion_bench_multi", path)
    module = importlib.util.module_from_spec(spec)
    before = os.environ.get("LORAFUSION_TUNE_MAX")
    spec.loader.exec_module(module)  # sets LORAFUSION_TUNE_MAX=1 for the script; undo that here
    if before is None:
        os.environ.pop("LORAFUSION_TUNE_MAX", None)
    return module


def test_bf16_benchmark_shape_4_adapters():
    mb = _bench()
    line, ok = mb.check_case("4 adapters", (1024, 1536, 2560, 3072), mb.RANKS4, [0.1] * 4)
    assert ok, line


def test_bf16_odd_segments_gaps_bias_rank256():
    mb = _bench()
    line, ok = mb.check_case("odd", (1, 0, 37, 70, 999), (1, 5, 24, 256, 16), [0.1, 0.1, 0.0, 0.25, 0.1],
                             k=1000, n=768, gap=5, bias=True)
    assert ok, line


def test_bf16_64_adapters_of_128_tokens():
    mb = _bench()
    line, ok = mb.check_case("64x128", (128,) * 64, mb.RANKS4 * 16, [0.1] * 64)
    assert ok, line


def test_deterministic_bitwise():
    line, ok = _bench().check_deterministic()
    assert ok, line


def test_cuda_graph_capture_and_replay_with_new_routing():
    line, ok = _bench().check_graph()
    assert ok, line
