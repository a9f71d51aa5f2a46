"""benchmarks/trace_summary.py on a small synthetic Chrome trace: families, sums, counts, span and idle time."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trace_summary as ts  # noqa: E402


def _trace():
    def ev(name, ts_us, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts_us, "dur": dur}

    return {"traceEvents": [
        ev("_lora_gemm_kernel", 100, 50),
        ev("da_kernel", 160, 10),  # idle 10 us before it
        ev("shrink_kernel", 165, 10),  # overlaps the previous one: no idle
        ev("nvjet_sm90_tst_256x128", 200, 20),  # idle 25
        ev("Memcpy DtoD (Device -> Device)", 220, 5, cat="gpu_memcpy"),
        ev("void at::native::vectorized_elementwise_kernel<8>", 225, 3),
        ev("my_custom_kernel", 228, 2),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 999},  # host events are ignored
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 50},  # not a complete event
    ]}


def test_summary_sums_families_and_measures_idle_time():
    s = ts.summarize(ts.gpu_events(_trace()))
    assert s.family_us["fused GEMMs (base_expand, dX)"] == 50
    assert (s.family_us["dA"], s.family_us["shrink"], s.family_us["cuBLAS GEMMs"]) == (10, 10, 20)
    assert s.family_count["copies"] == 1 and s.family_us["ATen elementwise / reductions"] == 3
    assert s.family_us["other"] == 2 and sum(s.family_count.values()) == 7
    assert s.busy_us == 100
    assert s.span_us == 130  # 100 .. 230
    assert s.idle_us == 35


def test_family_of_takes_the_first_match():
    assert ts.family_of("triton_poi_fused_mul_silu_8") == "Inductor (triton_*)"
    assert ts.family_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert ts.family_of("_split_kernel") == "shrink + dA (Gluon)"
    assert ts.family_of("something_new") == "other"


def test_cli_prints_one_column_per_trace_and_the_longest_kernels(tmp_path):
    paths = []
    for name in ("profile-floor_cg-pNone.trace.json", "profile-ours_cg-p0.1.trace.json"):
        path = tmp_path / name
        path.write_text(json.dumps(_trace()))
        paths.append(str(path))
    table = ts.main([*paths, "--top", "2"])
    header = table.splitlines()[0]
    assert "floor_cg-pNone" in header and "ours_cg-p0.1" in header
    assert "50.00" not in table and "0.05 (1)" in table  # ms with the count
    assert "ours_cg-p0.1: the 2 longest kernels" in table and "_lora_gemm_kernel" in table
    with pytest.raises(SystemExit):
        ts.main([str(tmp_path / "missing.json")])
