"""Write the kernels the backend uses to a directory: sources plus ``manifest.json``.

Layout: ``<dump_dir>/<spec key>/<kernel>.py`` (one file per generated Triton kernel,
byte-identical to what is compiled) and ``<dump_dir>/manifest.json``: one entry per
matched site with its module path, kernel set, specialization key and kernel files.
Sites on the torch kernel set have no generated source; the manifest says so. Sites on the
``"gluon"`` and ``"gluon-gemms"`` sets list the same Triton sources and a note naming the Gluon
modules (plain Python source, not rendered) that run some kernels where they apply. A site of a
shared-input group (``share_inputs``) runs the group's shrink and dA, specialised for the
group's total rank: its entry names those files and the ``shared_rank``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from .passes.lora_pattern import LoRASite

__all__ = ["dump_kernels", "spec_for_site"]

_GLUON_SPLIT_NOTE = ("shrink and dA run from lorafusion_compiler/codegen/gluon/split_kernels.py and dS/dB from "
                     "codegen/gluon/ds_db.py where they apply")
_GLUON_NOTES = {
    "gluon": _GLUON_SPLIT_NOTE + ", else as the files listed",
    "gluon-gemms": _GLUON_SPLIT_NOTE + ", base_expand and dx from codegen/gluon/lora_gemm.py where they apply, "
                   "else as the files listed",
}
"""The manifest's note for a site on a Gluon kernel set: which kernels may run from which Gluon module."""


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spec_for_site(site: LoRASite, *, deterministic: bool):
    """The codegen ``KernelSpec`` a site compiles to."""
    from .codegen import KernelSpec, rank_bucket

    return KernelSpec(
        dtype=_dtype_name(site.dtype),
        adapter_dtype=_dtype_name(site.adapter_dtype),
        has_weight=site.fused_base,
        has_bias=site.has_bias,
        dropout=site.dropout_p > 0,
        needs_dx=site.x_requires_grad,
        rank_bucket=rank_bucket(site.rank),
        aligned8=site.in_features % 8 == 0,
        deterministic=deterministic,
    )


def _write(path: Path, text: str) -> None:
    """Atomic write: a reader never sees a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_sources(root: Path, spec, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Write the kernel sources of ``spec`` (all it needs, or ``names``) under ``root/<spec key>/``;
    kernel name -> relative path."""
    from .codegen import kernel_sources

    folder = root / spec.key
    folder.mkdir(exist_ok=True)
    files = {}
    for name, source in kernel_sources(spec).items():
        if names is not None and name not in names:
            continue
        _write(folder / f"{name}.py", source)
        files[name] = f"{spec.key}/{name}.py"
    return files


def dump_kernels(dump_dir: str | os.PathLike, sites: list[LoRASite], kernels: list[str], *, deterministic: bool = False,
                 shared_rank: Mapping[int, int] | None = None) -> Path:
    """Write sources and append the sites to ``manifest.json`` in ``dump_dir``; returns the manifest path.

    ``shared_rank``: site index -> total rank of its shared-input group (module docstring)."""
    shared_rank = shared_rank or {}
    root = Path(dump_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"sites": []}
    for i, (site, kernel_set) in enumerate(zip(sites, kernels, strict=True)):
        entry = {
            "module_path": site.module_path,
            "kernels": kernel_set,
            "rank": site.rank,
            "in_features": site.in_features,
            "out_features": site.out_features,
            "dropout_p": site.dropout_p,
            "fused_base": site.fused_base,
        }
        if kernel_set != "torch":
            from .codegen import rank_bucket

            spec = spec_for_site(site, deterministic=deterministic)
            files = _write_sources(root, spec)
            if i in shared_rank:  # the group's one shrink and dA, at the group's total rank
                group_spec = dataclasses.replace(spec, rank_bucket=rank_bucket(shared_rank[i]))
                files.update(_write_sources(root, group_spec, ("shrink", "da")))
                entry.update(shared_rank=shared_rank[i])
            entry.update(specialization=spec.key, files=files)
            if kernel_set.startswith("gluon"):
                entry.update(note=_GLUON_NOTES[kernel_set])
        else:
            entry.update(specialization=None, files={}, note="torch reference ops (lorafusion_compiler/ops/reference.py); no generated source")
        manifest["sites"].append(entry)
    _write(manifest_path, json.dumps(manifest, indent=2))
    return manifest_path
