"""benchmarks/profiling.py (the profiled call of e2e.py and layer.py) on a CPU call: it writes the op
table and a Chrome trace that trace_summary.py reads; the hot calls run unprofiled first."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profiling  # noqa: E402
import trace_summary  # noqa: E402


def test_profile_call_writes_the_op_table_and_a_trace_summary_reads(tmp_path):
    calls = []
    a = torch.randn(64, 64)

    def call():
        calls.append(1)
        return a @ a

    path = tmp_path / "profile-layer-64x64x64-r16-p0.1-gluon.txt"
    profiling.profile_call(call, str(path), hot_calls=3)
    assert len(calls) == 4  # three hot calls, then the profiled one
    assert "aten::mm" in path.read_text()
    trace = path.with_name(path.name.removesuffix(".txt") + ".trace.json")
    assert any(e.get("name") == "aten::mm" for e in json.loads(trace.read_text())["traceEvents"])
    table = trace_summary.main([str(trace)])  # no GPU events on a CPU: the totals are zero
    assert "layer-64x64x64-r16-p0.1-gluon" in table and "all GPU events" in table
