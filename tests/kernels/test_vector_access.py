"""The multi-adapter kernels move their tiles with the same vector instructions as the single-adapter ones.

Adapter addresses come from device tables, so the compiler can only vectorise their loads and
atomics through ``tl.multiple_of`` hints; a hint placed where Triton drops it (e.g. on the integer
before its cast to a pointer) silently turned A/B tile loads and dB/dA atomics scalar and cost
H100 +17 µs in shrink and +20 µs in ds_db (docs/kernel-notes/multi-adapter.md). Likewise the keep bits that dA
stores and dX reads move as vectors only while their row stride is an argument Triton can
specialise (computed as K // 8 in the kernel it gave 16-bit accesses). Compiled for sm_90 with
Triton's bundled ptxas, no GPU needed; each kernel in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ptx_access.py")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return (Path(compiler.__file__).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend with its bundled ptxas is not installed")
@pytest.mark.parametrize("kernel", ["shrink", "ds_db", "da", "dx"])
def test_multi_kernel_tiles_use_vector_instructions(kernel, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORAFUSION_CACHE_DIR"] = str(tmp_path / "kernels")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    done = subprocess.run([sys.executable, str(SCRIPT), kernel], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    single, multi = got["single"], got["multi"]
    for form, found in got.items():  # tiles and keep bits: no 8- or 16-bit scalar loads or stores
        narrow = {name: n for name, n in found.items() if re.fullmatch(r"(ld|st)\.global\.[bu](8|16)", name)}
        assert not narrow, f"{kernel} ({form}): narrow scalar accesses {narrow}"
    scalar = {name: n for name, n in multi.items() if name == "red.global.gpu.relaxed.add.f32"}
    assert not scalar, f"{kernel}: scalar tile accesses in the multi-adapter kernel: {scalar} (single: {single})"
    for name in ("cp.async.cg.shared.global", "cp.async.ca.shared.global", "red.global.gpu.relaxed.add.v4.f32"):
        assert multi.get(name, 0) == single.get(name, 0), f"{kernel}: {name} single {single} multi {multi}"
    assert sum(single.get(n, 0) for n in ("cp.async.cg.shared.global", "cp.async.ca.shared.global")) > 0, single
