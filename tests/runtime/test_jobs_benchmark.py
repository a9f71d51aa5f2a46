"""CPU smoke test of benchmarks/jobs.py (jobs together vs one after another): it runs and reports both rates."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_jobs_benchmark_reports_both_sides():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "jobs.py"), "--tiny", "--device", "cpu", "--layers", "1", "--jobs", "2",
           "--samples", "8", "--capacity", "256", "--pad-multiple", "16", "--global-batch-size", "4", "--window", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert [r["job"] for r in report["one_after_another"]] == ["job0", "job1"]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in report["one_after_another"])
    assert report["together"]["steady_windows"] == report["together"]["windows"] - 1 >= 1
    assert report["together"]["tokens"] > 0 and report["together_over_one_after_another"] > 0
