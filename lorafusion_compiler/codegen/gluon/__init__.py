"""Hopper (sm_90) kernels written in Gluon (``triton.experimental.gluon``), Triton's explicit-layout
dialect: TMA, mbarriers, async wgmma and warp-specialised partitions that the ``tl`` templates
cannot express on Hopper (``docs/gemm-rewrite-plan.md``).

Today this holds the plain persistent GEMM (``gemm``) that the fused LoRA GEMMs will be built on;
it runs at cuBLAS speed on an H200 (``docs/kernel-notes/fused-gemms.md``) and is measured by
``benchmarks/gemm_check.py``. Gluon has no interpreter: these kernels run on a GPU only, written
against the Gluon API of Triton 3.6.
"""

from .ws_gemm import DEFAULT_CONFIGS, GemmConfig, gemm

__all__ = ["DEFAULT_CONFIGS", "GemmConfig", "gemm"]
