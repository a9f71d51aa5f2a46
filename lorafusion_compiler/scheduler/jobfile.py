"""Jobs files (YAML or JSON): planning settings plus jobs with length lists or distributions.

Format (every top-level key but ``jobs`` is optional; command-line flags override them)::

    capacity: 8192          # tokens per microbatch
    pad_multiple: 128       # tokens; capacity must be a multiple
    stages: 4               # pipeline stages
    time_limit_s: 2.0       # CP-SAT budget, seconds
    seed: 0
    jobs:
      - name: summarize-news
        global_batch_size: 32
        rank: 16              # optional, default 16
        epochs: 1             # optional
        max_steps: 10         # optional
        distribution: xsum    # a name, a mix name, or {xsum: 1, wikisum: 2}
        num_samples: 512
        seed: 7               # optional, default: the job's index in the file
        max_tokens: 4096      # optional truncation, default: capacity
      - name: hand-written
        global_batch_size: 2
        lengths: [120, 340, 90, 4000]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .distributions import sample_lengths
from .jobs import Job
from .plan import ScheduleConfig

__all__ = ["SETTING_KEYS", "JobsFile", "load_jobs_file"]

SETTING_KEYS = ("capacity", "pad_multiple", "stages", "time_limit_s", "seed")
"""Top-level keys passed on to ``schedule()``."""

_JOB_KEYS = {"name", "global_batch_size", "rank", "epochs", "max_steps"}
_LENGTH_KEYS = {"lengths"}
_DISTRIBUTION_KEYS = {"distribution", "num_samples", "seed", "max_tokens"}


@dataclass(kw_only=True)
class JobsFile:
    """A parsed jobs file."""

    jobs: list[Job]
    """The jobs, in file order."""
    settings: dict[str, Any] = field(default_factory=dict)
    """``schedule()`` keyword arguments: file values with overrides applied."""


def _read(path: Path) -> Any:
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot parse jobs file {path}: {exc}") from exc


def _job(entry: Any, index: int, capacity: int, path: Path) -> Job:
    where = f"jobs[{index}] in {path}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping with name, global_batch_size and lengths or distribution")
    unknown = set(entry) - _JOB_KEYS - _LENGTH_KEYS - _DISTRIBUTION_KEYS
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; allowed: "
                         f"{sorted(_JOB_KEYS | _LENGTH_KEYS | _DISTRIBUTION_KEYS)}")
    for key in ("name", "global_batch_size"):
        if key not in entry:
            raise ValueError(f"{where} lacks {key!r}")
    has_lengths = "lengths" in entry
    if has_lengths == ("distribution" in entry):
        raise ValueError(f"{where} needs exactly one of 'lengths' (a list) or 'distribution' (+ num_samples)")
    if has_lengths:
        extra = set(entry) & _DISTRIBUTION_KEYS
        if extra:
            raise ValueError(f"{where} gives 'lengths', so {sorted(extra)} do not apply; remove them")
        lengths = entry["lengths"]
    else:
        if "num_samples" not in entry:
            raise ValueError(f"{where} uses a distribution and needs 'num_samples'")
        lengths = sample_lengths(
            entry["distribution"],
            entry["num_samples"],
            seed=entry.get("seed", index),
            max_tokens=entry.get("max_tokens", capacity),
        )
    return Job(**{k: v for k, v in entry.items() if k in _JOB_KEYS}, lengths=lengths)


def load_jobs_file(path: str | Path, **overrides: Any) -> JobsFile:
    """Read a YAML/JSON jobs file; ``overrides`` (non-None) replace top-level settings."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data, Mapping) or "jobs" not in data:
        raise ValueError(f"jobs file {path} must be a mapping with a 'jobs' list")
    unknown = set(data) - {"jobs", *SETTING_KEYS}
    if unknown:
        allowed = ", ".join(["jobs", *SETTING_KEYS])
        raise ValueError(f"jobs file {path} has unknown keys {sorted(unknown)}; allowed: {allowed}")
    settings = {k: data[k] for k in SETTING_KEYS if k in data}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    entries = data["jobs"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"'jobs' in {path} must be a non-empty list")
    capacity = settings.get("capacity", ScheduleConfig.capacity)
    return JobsFile(jobs=[_job(e, k, capacity, path) for k, e in enumerate(entries)], settings=settings)
