"""CPU test of benchmarks/split_check.py: its shapes parse, and every row it times is a call that runs
(the reference kernel set on CPU tensors)."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import split_check  # noqa: E402


def test_shapes_parse_and_bad_ones_are_named():
    assert split_check.parse_shape("8192x4096X14336") == (8192, 4096, 14336)
    for bad in ("8192x4096", "8192x0x4", "ax4x4"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad):
            split_check.parse_shape(bad)


def test_every_row_is_a_runnable_call():
    calls = split_check.kernel_calls(40, 64, 24, ["torch"], device="cpu")
    p = split_check.P
    assert list(calls) == ["read x (x.sum)", "torch shrink p=0", f"torch shrink p={p}", "torch ds_db", "torch dA p=0",
                           f"torch dA p={p} + keep bits"]
    shapes = [tuple(out.shape) if isinstance(out, torch.Tensor) else tuple(o.shape for o in out) for out in
              (fn() for fn in calls.values())]
    assert shapes == [(), (40, 16), (40, 16), ((40, 16), (24, 16)), (16, 64), (16, 64)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_main_says_it_needs_a_gpu():
    with pytest.raises(SystemExit):
        split_check.main(["--shapes", "64x64x64"])
