"""Synthetic sample-length distributions for benchmarks (log-normal, in tokens).

Each distribution is a log-normal over the tokenized length of one training sample
(prompt template + document + reference summary, Llama-style BPE). The parameters are
*not* fitted to tokenized copies of the datasets (none is available offline); they are
set from published corpus statistics so the three have the right scale and ordering:

- ``xsum``: XSum documents average 431 words and summaries 23 words (Narayan et al.,
  2018); at ~1.3 BPE tokens per word plus a short prompt that is ~600 tokens.
- ``cnn_dailymail``: articles average 781 tokens and highlights 56 (Nallapati et al.,
  2016, PTB tokens); at ~1.25 BPE tokens per PTB token that is ~1,050 tokens. The
  collection dropped articles above 2,000 tokens, hence the narrower spread.
- ``wikisum``: the WikiSum card (d0rj/wikisum) lists 315,275,236 bytes for 35,775 train
  examples, 8.8 kB per example with all fields; at ~4 bytes per token, minus the url,
  title and step-header fields, that is ~1,900 tokens.

The spread sigma (std of ln length) is a judgement call: 0.5 (coefficient of variation
0.53) for news, 0.45 for the length-capped CNN/DailyMail, 0.55 for the long-tailed
how-to articles. ``mu`` follows from the mean: mu = ln(mean) - sigma^2 / 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .jobs import Job

__all__ = [
    "DISTRIBUTIONS",
    "MIXES",
    "LengthDistribution",
    "resolve_mixture",
    "sample_lengths",
    "synthetic_jobs",
]


@dataclass(frozen=True, kw_only=True)
class LengthDistribution:
    """A log-normal distribution of sample lengths (tokens)."""

    name: str
    """Registry name, e.g. ``"xsum"``."""
    mean_tokens: float
    """Mean sample length (tokens) before clipping."""
    sigma: float
    """Standard deviation of ln(length)."""

    @property
    def mu(self) -> float:
        """Mean of ln(length): ln(mean_tokens) - sigma^2 / 2."""
        return math.log(self.mean_tokens) - self.sigma**2 / 2

    @property
    def median_tokens(self) -> float:
        """Median sample length (tokens): exp(mu)."""
        return math.exp(self.mu)


DISTRIBUTIONS: dict[str, LengthDistribution] = {
    d.name: d
    for d in (
        LengthDistribution(name="xsum", mean_tokens=600.0, sigma=0.50),
        LengthDistribution(name="cnn_dailymail", mean_tokens=1050.0, sigma=0.45),
        LengthDistribution(name="wikisum", mean_tokens=1900.0, sigma=0.55),
    )
}
"""The single-dataset distributions, by name."""

MIXES: dict[str, dict[str, float]] = {
    "mix": {"xsum": 1.0, "cnn_dailymail": 1.0, "wikisum": 1.0},
    "news_mix": {"xsum": 1.0, "cnn_dailymail": 1.0},
}
"""Named mixtures: relative weights of the single-dataset distributions."""


def resolve_mixture(distribution: str | Mapping[str, float]) -> dict[str, float]:
    """Turn a distribution name, mix name or ``{name: weight}`` mapping into normalized weights."""
    if isinstance(distribution, str):
        if distribution in DISTRIBUTIONS:
            weights: Mapping[str, float] = {distribution: 1.0}
        elif distribution in MIXES:
            weights = MIXES[distribution]
        else:
            known = sorted([*DISTRIBUTIONS, *MIXES])
            raise ValueError(f"unknown length distribution {distribution!r}; choose one of {known}")
    else:
        weights = distribution
    if not weights:
        raise ValueError("a distribution mixture needs at least one {name: weight} entry")
    for name, weight in weights.items():
        if name not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown length distribution {name!r} in mixture; choose from {sorted(DISTRIBUTIONS)}"
            )
        if not weight > 0:
            raise ValueError(f"mixture weight of {name!r} is {weight!r}; weights must be > 0")
    total = float(sum(weights.values()))
    return {name: weights[name] / total for name in sorted(weights)}


def sample_lengths(
    distribution: str | Mapping[str, float],
    num_samples: int,
    *,
    seed: int = 0,
    max_tokens: int = 8192,
    min_tokens: int = 16,
) -> list[int]:
    """Draw ``num_samples`` sample lengths (tokens) from a named distribution or mixture.

    Lengths are rounded to ints and clipped to ``[min_tokens, max_tokens]``, the way a
    trainer truncates to its maximum sequence length. Same arguments, same lengths.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(
            f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, max_tokens={max_tokens}"
        )
    weights = resolve_mixture(distribution)
    rng = np.random.default_rng(seed)
    names = list(weights)
    choice = rng.choice(len(names), size=num_samples, p=[weights[n] for n in names])
    mus = np.array([DISTRIBUTIONS[n].mu for n in names])[choice]
    sigmas = np.array([DISTRIBUTIONS[n].sigma for n in names])[choice]
    raw = np.exp(rng.normal(mus, sigmas))
    return [int(v) for v in np.clip(np.rint(raw), min_tokens, max_tokens)]


def synthetic_jobs(
    num_jobs: int,
    samples_per_job: int,
    *,
    distributions: Sequence[str | Mapping[str, float]] = ("xsum", "cnn_dailymail", "wikisum"),
    global_batch_size: int = 16,
    seed: int = 0,
    max_tokens: int = 8192,
) -> list[Job]:
    """Build ``num_jobs`` jobs named ``job000``... cycling through ``distributions``.

    Job ``k`` draws its lengths (tokens, clipped to ``max_tokens``) with seed ``seed + k``.
    """
    if num_jobs < 1:
        raise ValueError(f"num_jobs must be >= 1, got {num_jobs}")
    if not distributions:
        raise ValueError("distributions must name at least one distribution")
    return [
        Job(
            name=f"job{k:03d}",
            lengths=sample_lengths(
                distributions[k % len(distributions)], samples_per_job, seed=seed + k, max_tokens=max_tokens
            ),
            global_batch_size=global_batch_size,
        )
        for k in range(num_jobs)
    ]
