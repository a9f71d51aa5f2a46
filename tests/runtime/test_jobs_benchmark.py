"""CPU smoke test of benchmarks/jobs.py (jobs together vs one after another): it runs and reports both rates."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_jobs_benchmark_reports_both_sides():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "jobs.py"), "--tiny", "--device", "cpu", "--layers", "1", "--jobs", "2",
           "--samples", "8", "--capacity", "256", "--pad-multiple", "16", "--global-batch-size", "4", "--window", "2",
           "--variants", "seq", "together"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    seq, together = report["results"]["seq"], report["results"]["together"]
    assert [r["job"] for r in seq["jobs"]] == ["job0", "job1"]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in seq["jobs"])
    assert seq["tokens"] == sum(r["tokens"] for r in seq["jobs"])
    assert together["steady_windows"] == together["windows"] - 1 >= 1 and together["tokens"] > 0
    assert report["over_seq"]["seq"] == 1.0 and report["over_seq"]["together"] > 0
