"""Hopper (sm_90) kernels written in Gluon (``triton.experimental.gluon``), Triton's explicit-layout
dialect: TMA, mbarriers, async wgmma and warp-specialised partitions that the ``tl`` templates
cannot express on Hopper (``docs/gemm-rewrite-plan.md``).

* ``ws_gemm``: a persistent warp-specialised GEMM (``gemm``), at cuBLAS speed on an H200;
* ``lora_gemm``: the fused ``base_expand`` and ``dx`` built on it (``low_rank_tiles``: the device
  pieces of their low-rank prologue);
* ``split_kernels``: shrink and dA with the dropout mask (``masked_tiles``: the mask and the TMA ring);
* ``ds_db``: dS and dB from one read of dY (the same TMA ring);
* ``kernel_set``: the ``"gluon"`` kernel set (split kernels and ds_db where they apply, the Triton
  kernels elsewhere, the fused GEMMs included); ``kernels="auto"`` picks it for bf16 with CUDA graphs
  on Hopper (``backend.kernel_set_for``);
* ``gemm_set``: the ``"gluon-gemms"`` kernel set (``"gluon"`` with the ``lora_gemm`` GEMMs: faster on a
  cool GPU, slower at the power cap).

Measured by ``benchmarks/gemm_check.py`` (``docs/kernel-notes/fused-gemms.md``). Gluon has no
interpreter: these kernels run on a GPU only, written against the Gluon API of Triton 3.6.
"""

from .ws_gemm import DEFAULT_CONFIGS, GemmConfig, gemm

__all__ = ["DEFAULT_CONFIGS", "GemmConfig", "gemm"]
