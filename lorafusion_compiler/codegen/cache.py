"""Compile-once cache: rendered source -> file on disk -> imported module -> Triton kernel.

Triton's JIT reads a kernel's source through ``inspect``, so every rendered source is
written to a real file (named by the hash of its text, so the file name is stable across
processes) and imported from there; this works on the GPU and under TRITON_INTERPRET=1.
The directory is ``$LORAFUSION_CACHE_DIR`` or ``~/.cache/lorafusion/kernels``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .render import KernelSpec, render

__all__ = ["cache_dir", "load_kernel"]

_LOADED: dict[tuple[str, KernelSpec], Any] = {}


def cache_dir() -> Path:
    """Directory that receives the rendered kernel sources (created on first use)."""
    root = os.environ.get("LORAFUSION_CACHE_DIR") or Path.home() / ".cache" / "lorafusion" / "kernels"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_once(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_kernel(kernel: str, spec: KernelSpec) -> Any:
    """The ``triton.jit`` function ``{kernel}_kernel`` for ``spec``, rendered and imported once per process."""
    spec = spec.for_kernel(kernel)
    hit = _LOADED.get((kernel, spec))
    if hit is not None:
        return hit
    source = render(kernel, spec)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = cache_dir() / f"{kernel}_{digest}.py"
    _write_once(path, source)
    module_name = f"lorafusion_kernels.{kernel}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    fn = getattr(module, f"{kernel}_kernel")
    _LOADED[(kernel, spec)] = fn
    return fn
