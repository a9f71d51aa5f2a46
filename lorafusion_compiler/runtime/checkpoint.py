"""Checkpoints of a multi-job pipeline run: PEFT adapters, optimizer states, run position.

Layout under ``out_dir`` (every write goes to a temporary path first, then ``os.replace``)::

    schedule.json                     the plan (ordered microbatch items), written once
    <job>/step-<n>/                   job ``<job>`` after ``n`` optimizer steps
        adapter_config.json           PEFT format: ``PeftModel.from_pretrained(base, dir)``
        adapter_model.safetensors
        optimizer-stage<s>.pt         AdamW state of the job's parameters on stage ``s``
        job.json                      {"job", "steps_done"}
    runtime/round-<k>/rng-stage<s>.pt torch (+ CUDA) RNG state of stage ``s`` before round ``k``
    state.json                        commit point: {"next_round": k, "jobs": {job: {"steps_done",
                                      "dir"}}, "runtime": "runtime/round-<k>"}

A checkpoint exists once ``state.json`` names it. At start, ``clean_uncommitted`` removes what
a run that died after its last commit left behind; during a run a ``step-<n>`` folder that
already exists is the committed one of an unchanged job and is not rewritten. With several ranks,
all ranks share ``out_dir`` (one file system); rank 0 writes adapters and ``state.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["adapter_dir", "clean_uncommitted", "load_checkpoint", "read_state", "save_checkpoint", "write_json_atomic"]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file + fsync + ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_torch_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def adapter_dir(out_dir: str | Path, job: str, steps_done: int) -> Path:
    """Folder of job ``job``'s checkpoint after ``steps_done`` optimizer steps."""
    return Path(out_dir) / job / f"step-{steps_done}"


def read_state(out_dir: str | Path) -> dict | None:
    """The committed ``state.json`` of ``out_dir``, or None if there is none."""
    path = Path(out_dir) / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def clean_uncommitted(out_dir: str | Path, job_names: list[str]) -> list[Path]:
    """Remove what a crashed run wrote after its last commit: ``<job>/step-<n>`` folders with
    ``n`` above the committed step count (all of them when nothing is committed), temporary
    folders and files, and runtime folders other than the committed one. Returns what was removed."""
    out = Path(out_dir)
    state = read_state(out)
    committed = {name: entry["steps_done"] for name, entry in (state or {}).get("jobs", {}).items()}
    removed = []
    for name in job_names:
        folder = out / name
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            stale = child.name.startswith(".tmp-")
            if child.name.startswith("step-") and child.name[5:].isdigit():
                stale = int(child.name[5:]) > committed.get(name, -1)
            if stale:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    runtime = out / "runtime"
    keep = (out / state["runtime"]).resolve() if state else None
    if runtime.is_dir():
        for child in runtime.iterdir():
            if child.resolve() != keep:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(
    out_dir: str | Path,
    *,
    next_round: int,
    steps_done: Mapping[str, int],
    peft_model: torch.nn.Module,
    owned: Callable[[str], bool],
    optimizers: Mapping[str, torch.optim.Optimizer | None],
    stage: int,
    device: torch.device,
    barrier: Callable[[], None],
    gather: Callable[[Any], list[Any] | None],
) -> None:
    """Commit a checkpoint taken before round ``next_round`` (call on every rank, same order).

    ``owned(param_name)``: whether this rank's stage trains that parameter; ``gather(obj)``
    returns the list of every rank's ``obj`` on rank 0 (None elsewhere); ``barrier()`` syncs ranks.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out_dir)
    is_root = stage == 0
    named = dict(peft_model.named_parameters())
    for job, n in steps_done.items():
        final = adapter_dir(out, job, n)
        if final.exists():
            continue
        tmp = final.with_name(f".tmp-step-{n}")
        if is_root:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if optimizers.get(job) is not None:
            torch.save(optimizers[job].state_dict(), tmp / f"optimizer-stage{stage}.pt")
        local = {k: v.detach().cpu().clone() for k, v in named.items() if owned(k) and f".{job}." in k and "lora_" in k}
        parts = gather(local)
        barrier()
        if is_root:
            merged: dict[str, torch.Tensor] = {}
            for part in parts:
                merged.update(part)
            weights = get_peft_model_state_dict(peft_model, state_dict=merged, adapter_name=job)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            peft_model.peft_config[job].save_pretrained(str(tmp))
            write_json_atomic(tmp / "job.json", {"job": job, "steps_done": n})
            os.replace(tmp, final)
    runtime = out / "runtime" / f"round-{next_round}"
    runtime.mkdir(parents=True, exist_ok=True)
    _save_torch_atomic(_rng_state(device), runtime / f"rng-stage{stage}.pt")
    barrier()
    if is_root:
        write_json_atomic(out / "state.json", {
            "next_round": next_round,
            "jobs": {job: {"steps_done": n, "dir": str(adapter_dir(out, job, n).relative_to(out))} for job, n in steps_done.items()},
            "runtime": str(runtime.relative_to(out)),
        })
    barrier()


def load_checkpoint(
    out_dir: str | Path,
    *,
    peft_model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer | None],
    stage: int,
    device: torch.device,
) -> dict | None:
    """Load the committed checkpoint of ``out_dir`` into ``peft_model`` / ``optimizers`` and
    restore this rank's RNG; return the state dict (``next_round``, ``jobs``) or None."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    out = Path(out_dir)
    state = read_state(out)
    if state is None:
        return None
    for job, entry in state["jobs"].items():
        folder = out / entry["dir"]
        if entry["steps_done"] == 0 and not (folder / "adapter_model.safetensors").exists():
            continue
        weights = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=job)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint {folder} has keys the model lacks: {unexpected[:3]}; was it written for another model?")
        opt_path = folder / f"optimizer-stage{stage}.pt"
        if optimizers.get(job) is not None and opt_path.exists():
            optimizers[job].load_state_dict(torch.load(opt_path, map_location=device, weights_only=True))
    rng = torch.load(out / state["runtime"] / f"rng-stage{stage}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return state
