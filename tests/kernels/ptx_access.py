"""Count the global-memory instructions of generated kernels compiled for sm_90, without a GPU.

Run as a script (``python tests/kernels/ptx_access.py KERNEL``) in a process where
TRITON_INTERPRET is unset: it renders KERNEL's single- and multi-adapter specialisations
(bf16, rank bucket 64, aligned adapters, dropout where the kernel has it), compiles them to
PTX for an H100 target with Triton's bundled ptxas, and prints one JSON object
{"single": {instruction: count}, "multi": {...}} of the loads, stores and atomics.
"""

from __future__ import annotations

import collections
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorafusion_compiler.codegen.cache import load_kernel
from lorafusion_compiler.codegen.render import KernelSpec

_F32 = {"ds_ptr", "db_ptr", "da_ptr", "ftab_ptr"}
_I32 = {"tiles_ptr", "blk_ptr"}
_I64 = {"itab_ptr", "seed_ptr"}
_FP_SCALARS = {"scale", "inv_keep", "lscale"}
_UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_sr", "stride_dyn", "stride_br", "stride_dsr", "stride_dbr", "stride_dak"}
_TILES = {  # (constexprs, num_warps): the tuner's first configs at rank bucket 64
    "shrink": (dict(BLOCK_M=32, BLOCK_K=128, BLOCK_R=64, K_SPLIT=2), 4),
    "ds_db": (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, N_SPLIT=2), 8),
    "da": (dict(BLOCK_M=64, BLOCK_K=128, BLOCK_R=64, M_SPLIT=2), 4),
}
_SPEC = {"shrink": dict(dropout=True), "ds_db": {}, "da": dict(dropout=True, keep_bits=True)}
_INSTR = re.compile(r"\b((?:ld|st|red|atom)\.global[.\w]*|cp\.async\.c[ag]\.shared\.global)")


def _arg_type(name: str) -> str:
    if name.endswith("_ptr"):
        return "*fp32" if name in _F32 else "*i32" if name in _I32 else "*i64" if name in _I64 else \
            "*u8" if name == "bits_ptr" else "*bf16"
    return "fp32" if name in _FP_SCALARS else "i32"


def counts(kernel: str, multi: bool) -> dict[str, int]:
    """Global load/store/atomic instruction counts of ``kernel``'s PTX (every pointer and integer
    argument 16-divisible, unit strides constant, as Triton specialises the benchmark shapes)."""
    spec = KernelSpec(dtype="bfloat16", adapter_dtype="bfloat16", rank_bucket=64, multi=multi,
                      adapters_aligned=multi and kernel != "da", **_SPEC[kernel])
    fn = load_kernel(kernel, spec)
    tiles, num_warps = _TILES[kernel]
    constexprs = {**tiles, **{n: 1 for n in _UNIT_STRIDES if n in fn.arg_names}}
    signature = {n: "constexpr" if n in constexprs else _arg_type(n) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constexprs and signature[n] != "fp32"}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    return dict(collections.Counter(m.group(1) for m in _INSTR.finditer(compiled.asm["ptx"])))


if __name__ == "__main__":
    print(json.dumps({"single": counts(sys.argv[1], False), "multi": counts(sys.argv[1], True)}))
