"""The ``lorafusion train`` config file (YAML or JSON), parsed into checked dataclasses.

Example (``lorafusion_compiler/product/examples/train.yaml``)::

    model: tiny                 # "tiny" (embedded LLaMa), {path: DIR} (local HF model), {config: {...}}
    dtype: float32
    out_dir: runs/example
    capacity: 512               # tokens per microbatch
    pad_multiple: 16
    jobs:
      - name: tales
        data: {text: tales, seq_len: 64}      # shipped text | {jsonl: FILE, field: text} | {tokens: FILE.pt}
        rank: 8
        alpha: 16
        dropout: 0.05
        lr: 0.002
        global_batch_size: 4
        steps: 20
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["DataConfig", "JobConfig", "TrainConfig", "load_train_config"]

_DTYPES = ("float32", "bfloat16", "float16")


def _reject_unknown(kind: str, raw: dict, allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown {kind} key(s) {unknown}; valid keys are {sorted(allowed)}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where a job's samples come from; exactly one of ``text``, ``jsonl``, ``tokens``."""

    text: str | None = None
    """Name of a shipped text (``tales``, ``recipes``, ``code``, ``facts``), cut into byte-token samples."""
    jsonl: str | None = None
    """A JSON-lines file; each line's ``field`` is one sample (byte tokens, or the model's tokenizer)."""
    field: str = "text"
    """Key of the sample text in each JSONL line."""
    tokens: str | None = None
    """A ``torch.save``d list of 1-D int64 token tensors."""
    seq_len: int = 128
    """Tokens per sample when cutting a text (``text``) or truncating long samples (all kinds)."""

    def __post_init__(self) -> None:
        given = [k for k in ("text", "jsonl", "tokens") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"job data needs exactly one of text, jsonl, tokens; got {given or 'none'}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """One adapter to train (see ``runtime.jobs.PipelineJob`` for the training semantics)."""

    name: str
    """Adapter name; also its output folder."""
    data: DataConfig
    """The job's samples."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha."""
    dropout: float = 0.0
    """LoRA dropout."""
    lr: float = 1e-4
    """AdamW learning rate."""
    global_batch_size: int = 8
    """Samples per optimizer step."""
    steps: int | None = None
    """Optimizer steps (None: ``epochs`` passes)."""
    epochs: int = 1
    """Passes over the data when ``steps`` is None."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping (None: off)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole ``lorafusion train`` run."""

    model: str | dict = "tiny"
    """``"tiny"``, ``{"path": DIR}`` (a local HF causal LM) or ``{"config": {TinyLlamaConfig fields}}``."""
    dtype: str = "float32"
    """Base model dtype: float32, bfloat16 or float16."""
    jobs: tuple[JobConfig, ...] = ()
    """The adapters to train together."""
    out_dir: str = "runs/lorafusion"
    """Checkpoints (PEFT adapters), metrics, report and timeline PNG go here."""
    capacity: int = 1024
    """Tokens per microbatch."""
    pad_multiple: int = 16
    """Each job's segment in a microbatch starts at a multiple of this."""
    resume: bool = False
    """Continue from ``out_dir``'s last checkpoint."""
    compile: bool | None = None
    """Compile stages with backend="lorafusion" (None: on CUDA only)."""
    seed: int = 0
    """Seed of data order, adapter init and dropout."""
    extra: dict = field(default_factory=dict, repr=False)
    """Further keyword arguments for ``pipeline()`` (the config's ``pipeline:`` mapping, e.g. ``checkpoint_every``,
    ``window_microbatches``, ``cudagraphs: false``)."""

    def __post_init__(self) -> None:
        if not self.jobs:
            raise ValueError("the config has no jobs; add at least one under 'jobs:'")
        names = [j.name for j in self.jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"job names must be unique, got {names}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {_DTYPES}")
        if not (self.model == "tiny" or (isinstance(self.model, dict) and len(self.model) == 1 and set(self.model) <= {"path", "config"})):
            raise ValueError(f"model={self.model!r}; use 'tiny', {{path: DIR}} or {{config: {{...}}}}")


def _job(raw: Any, index: int) -> JobConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"job {index} must be a mapping, got {type(raw).__name__}")
    allowed = {f.name for f in fields(JobConfig)}
    _reject_unknown(f"job {index}", raw, allowed)
    data = raw.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"job {index} ({raw.get('name')!r}) needs a 'data' mapping, e.g. {{text: tales}}")
    _reject_unknown(f"job {index} data", data, {f.name for f in fields(DataConfig)})
    return JobConfig(**{**raw, "data": DataConfig(**data)})


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a :class:`TrainConfig`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    allowed = {f.name for f in fields(TrainConfig)} - {"extra"} | {"pipeline"}
    _reject_unknown("config", raw, allowed)
    jobs = tuple(_job(j, i) for i, j in enumerate(raw.get("jobs") or []))
    rest = {k: v for k, v in raw.items() if k not in ("jobs", "pipeline")}
    return TrainConfig(**rest, jobs=jobs, extra=dict(raw.get("pipeline") or {}))
