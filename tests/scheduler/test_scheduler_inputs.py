"""Jobs, step semantics, length distributions, grouping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorafusion_compiler.scheduler import DISTRIBUTIONS, Job, sample_lengths, synthetic_jobs
from lorafusion_compiler.scheduler.grouping import balanced_partition, group_jobs, stagger_holds


def test_steps_follow_dataset_order_and_last_step_is_smaller():
    job = Job(name="a", lengths=[1] * 10, global_batch_size=4)
    assert job.steps_per_epoch == job.num_steps == 3
    assert [list(job.step_samples(t)) for t in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_epochs_replay_and_max_steps_truncate():
    job = Job(name="a", lengths=[1] * 5, global_batch_size=2, epochs=2)
    assert job.num_steps == 6
    assert list(job.step_samples(3)) == [0, 1]
    assert Job(name="b", lengths=[1] * 5, global_batch_size=2, epochs=2, max_steps=4).num_steps == 4
    with pytest.raises(ValueError, match="step 6 is out of range for job 'a', which has 6 steps"):
        job.step_samples(6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="", lengths=[1], global_batch_size=1), "job name must be a non-empty string"),
        (dict(name="a", lengths=[5, 0], global_batch_size=1), "sample 1 of job 'a' has length 0"),
        (dict(name="a", lengths=[5, 2.5], global_batch_size=1), "sample 1 of job 'a' has length 2.5"),
        (dict(name="a", lengths=[5], global_batch_size=0), "global_batch_size of job 'a' must be a positive integer"),
        (dict(name="a", lengths=[5], global_batch_size=1, rank=0), "rank of job 'a' must be a positive integer"),
        (dict(name="a", lengths=[5], global_batch_size=1, max_steps=0), "max_steps of job 'a'"),
    ],
)
def test_job_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Job(**kwargs)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_distribution_moments(name):
    dist = DISTRIBUTIONS[name]
    lengths = np.array(sample_lengths(name, 40_000, seed=1, max_tokens=1_000_000))
    assert lengths.mean() == pytest.approx(dist.mean_tokens, rel=0.03)
    assert np.log(lengths).std() == pytest.approx(dist.sigma, rel=0.05)
    assert dist.mu == pytest.approx(math.log(dist.mean_tokens) - dist.sigma**2 / 2)


def test_distributions_are_ordered_and_mixable():
    means = [DISTRIBUTIONS[n].mean_tokens for n in ("xsum", "cnn_dailymail", "wikisum")]
    assert means == sorted(means)
    mix = np.array(sample_lengths({"xsum": 1, "wikisum": 1}, 20_000, seed=2, max_tokens=100_000))
    expected = (DISTRIBUTIONS["xsum"].mean_tokens + DISTRIBUTIONS["wikisum"].mean_tokens) / 2
    assert mix.mean() == pytest.approx(expected, rel=0.05)
    assert sample_lengths("mix", 50, seed=3) == sample_lengths("mix", 50, seed=3)
    assert max(sample_lengths("wikisum", 5000, seed=4, max_tokens=2048)) == 2048


def test_unknown_distribution():
    with pytest.raises(ValueError, match="unknown length distribution 'arxiv'"):
        sample_lengths("arxiv", 10)


def test_synthetic_jobs():
    jobs = synthetic_jobs(5, 20, global_batch_size=4, seed=9)
    assert [job.name for job in jobs] == ["job000", "job001", "job002", "job003", "job004"]
    assert all(len(job.lengths) == 20 and job.num_steps == 5 for job in jobs)


def test_balanced_partition_pairs_long_with_short():
    assert balanced_partition([10, 1, 9, 2], 2) == [[0, 1], [2, 3]]
    groups = balanced_partition([5.0] * 7, 3)
    assert sorted(len(g) for g in groups) == [2, 2, 3]


def test_stagger_condition():
    capacity = 100
    assert stagger_holds([400, 400], capacity, stages=4)  # each sees 4 >= 3 other microbatches
    assert not stagger_holds([400, 200], capacity, stages=4)  # the 400 group sees only 2
    assert stagger_holds([100], capacity, stages=1)


def test_group_jobs_adds_groups_until_stagger_holds():
    jobs = [Job(name=f"j{k}", lengths=[1000] * 8, global_batch_size=8) for k in range(4)]
    # 8000 padded tokens per step each = 1 microbatch; S=4 needs >= 3 others -> 4 singleton groups.
    groups = group_jobs(jobs, capacity=8192, pad_multiple=8, stages=4, max_group_microbatches=8)
    assert sorted(map(len, groups)) == [1, 1, 1, 1]
    # With S=2 one other microbatch suffices: the size rule keeps everything in as few groups as possible.
    groups = group_jobs(jobs, capacity=8192, pad_multiple=8, stages=2, max_group_microbatches=8)
    assert sorted(map(len, groups)) == [2, 2]
