"""Count the global-memory instructions of generated kernels compiled for sm_90, without a GPU.

Run as a script (``python tests/kernels/ptx_access.py KERNEL``) in a process where
TRITON_INTERPRET is unset: it renders KERNEL's single- and multi-adapter specialisations
(bf16, rank bucket 64, aligned adapters, dropout where the kernel has it, dA storing and dX
reading the keep bits, dX in its pointer form rather than TMA), compiles them to
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
_MASKED = dict(dropout=True, keep_bits=True)  # dA stores the keep bits, dX reads them
_KERNELS = {  # kernel: (spec fields, the tuner's first tiles at rank bucket 64, unit strides, num_warps)
    "shrink": (dict(dropout=True), dict(BLOCK_M=32, BLOCK_K=128, BLOCK_R=64, K_SPLIT=2),
               {"stride_xk", "stride_ak", "stride_sr"}, 4),
    "ds_db": ({}, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, N_SPLIT=2),
              {"stride_dyn", "stride_br", "stride_sr", "stride_dsr", "stride_dbr"}, 8),
    "da": (_MASKED, dict(BLOCK_M=64, BLOCK_K=128, BLOCK_R=64, M_SPLIT=2), {"stride_xk", "stride_dsr", "stride_dak"}, 4),
    # dx in its pointer form (the TMA form takes host descriptors); l_ptr is dS (fp32)
    "dx": (_MASKED, dict(BLOCK_M=128, BLOCK_P=256, BLOCK_Q=64, BLOCK_R=16, GROUP_M=8),
           {"stride_xq", "stride_wp", "stride_lr", "stride_rp", "stride_op"}, 8),
}
_INSTR = re.compile(r"\b((?:ld|st|red|atom)\.global[.\w]*|cp\.async\.c[ag]\.shared\.global)")


def _arg_type(name: str, kernel: str) -> str:
    if name.endswith("_ptr"):
        if name in _F32 or (kernel, name) == ("dx", "l_ptr"):
            return "*fp32"
        return "*i32" if name in _I32 else "*i64" if name in _I64 else "*u8" if name == "bits_ptr" else "*bf16"
    return "fp32" if name in _FP_SCALARS else "i32"


def counts(kernel: str, multi: bool) -> dict[str, int]:
    """Global load/store/atomic instruction counts of ``kernel``'s PTX (every pointer and integer
    argument 16-divisible, unit strides constant, as Triton specialises the benchmark shapes)."""
    fields, tiles, unit_strides, num_warps = _KERNELS[kernel]
    spec = KernelSpec(dtype="bfloat16", adapter_dtype="bfloat16", rank_bucket=64, multi=multi,
                      adapters_aligned=multi and kernel != "da", **fields)
    fn = load_kernel(kernel, spec)
    constexprs = {**tiles, **{n: 1 for n in unit_strides if n in fn.arg_names}}
    signature = {n: "constexpr" if n in constexprs else _arg_type(n, kernel) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constexprs and signature[n] != "fp32"}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    return dict(collections.Counter(m.group(1) for m in _INSTR.finditer(compiled.asm["ptx"])))


if __name__ == "__main__":
    print(json.dumps({"single": counts(sys.argv[1], False), "multi": counts(sys.argv[1], True)}))
