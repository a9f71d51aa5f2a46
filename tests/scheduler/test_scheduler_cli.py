"""The ``schedule`` subcommand and the jobs-file loader."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import lorafusion_compiler.scheduler as scheduler
from lorafusion_compiler.scheduler import add_schedule_subcommand, load_jobs_file

EXAMPLE = Path(scheduler.__file__).parent / "examples" / "jobs.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorafusion")
    add_schedule_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_plans_the_example_and_writes_png_and_json(tmp_path, capsys):
    png, plan_json = tmp_path / "out" / "timeline.png", tmp_path / "plan.json"
    assert run(["schedule", str(EXAMPLE), "--png", str(png), "--json", str(plan_json)]) == 0
    out = capsys.readouterr().out
    for needle in ("microbatches:", "fill", "bubble ratio", "solver status", "planned in", str(png)):
        assert needle in out
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    plan = json.loads(plan_json.read_text())
    loaded = load_jobs_file(EXAMPLE)
    expected = sum(len(job.lengths) for job in loaded.jobs)  # one epoch each
    assert sum(len(mb["items"]) for mb in plan["microbatches"]) == expected
    assert plan["stats"]["bins"] >= plan["stats"]["lower_bound"]


def test_cli_flags_override_the_file(tmp_path, capsys):
    png = tmp_path / "t.png"
    assert run(["schedule", str(EXAMPLE), "--stages", "2", "--capacity", "4096", "--solver", "greedy",
                "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "capacity=4096" in out and "2 stages" in out


def test_cli_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("capacity: 8192\njobs:\n  - name: big\n    global_batch_size: 2\n    lengths: [10, 9000]\n")
    assert run(["schedule", str(bad), "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "sample 1 of job 'big' has 9000 tokens, more than capacity=8192" in err
    assert not (tmp_path / "x.png").exists()


def test_json_jobs_file_with_distribution(tmp_path):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps({
        "capacity": 2048,
        "jobs": [
            {"name": "w", "global_batch_size": 8, "distribution": "wikisum", "num_samples": 40},
            {"name": "m", "global_batch_size": 8, "distribution": {"xsum": 2, "cnn_dailymail": 1},
             "num_samples": 16, "seed": 5, "max_tokens": 1000},
        ],
    }))
    loaded = load_jobs_file(path, stages=3, seed=None)
    assert loaded.settings == {"capacity": 2048, "stages": 3}
    w, m = loaded.jobs
    assert len(w.lengths) == 40 and max(w.lengths) <= 2048  # max_tokens defaults to capacity
    assert len(m.lengths) == 16 and max(m.lengths) <= 1000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("jobs: []\n", "must be a non-empty list"),
        ("capacty: 10\njobs: [{name: a, global_batch_size: 1, lengths: [1]}]\n", r"unknown keys \['capacty'\]"),
        ("jobs: [{name: a, global_batch_size: 1}]\n", "exactly one of 'lengths'"),
        ("jobs: [{name: a, global_batch_size: 1, distribution: xsum}]\n", "needs 'num_samples'"),
        ("jobs: [{name: a, global_batch_size: 1, lengths: [1], seed: 3}]\n", r"\['seed'\] do not apply"),
        ("jobs: [{name: a, lengths: [1]}]\n", "lacks 'global_batch_size'"),
        ("jobs: [{name: a, global_batch_size: 1, lengths: [1], alpha: 2}]\n", r"unknown keys \['alpha'\]"),
    ],
)
def test_bad_jobs_files(tmp_path, text, message):
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_jobs_file(path)
