"""The ``lorafusion`` torch.compile backend.

``torch.compile(model, backend="lorafusion", options={...})`` finds this function through
the ``torch_dynamo_backends`` entry point. Per Dynamo graph it:

1. matches LoRA sites (``passes.lora_pattern``),
2. rewrites them into ``torch.ops.lorafusion.lora_linear`` (``passes.rewrite``); with the
   ``share_inputs`` option, sites without dropout that read one x into one
   ``lora_linear_shared`` (``passes.shared_input``),
3. reports them (``report``) and optionally dumps kernel sources (``dump``),
4. hands the rewritten graph to the inner backend (Inductor by default; its on-disk graph
   cache key includes our op schemas, ``passes.cache_salt``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from .config import LoRAFusionConfig
from .passes.lora_pattern import find_lora_sites
from .passes.multi_kernels import select_multi_kernels
from .passes.rewrite import rewrite_lora_sites
from .passes.shared_input import shared_input_groups
from .report import publish

__all__ = ["lorafusion_backend", "kernel_set_for"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


GLUON_TRITON_VERSIONS = ("3.6.",)
"""Triton releases whose Gluon API the Gluon kernels were validated on (on an H200); Gluon is
experimental and changes between releases, so ``"auto"`` stays with Triton elsewhere (``kernels="gluon"``
or ``"gluon-gemms"`` still force them)."""


def _gluon_available(device: torch.device) -> bool:
    """A Hopper GPU, and a Triton whose Gluon API the Gluon kernels were validated on."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        import triton

        from .codegen.gluon import lora_gemm  # noqa: F401  (the Gluon symbols the kernels use)
    except Exception:  # no Gluon, or one without those symbols
        return False
    return triton.__version__.startswith(GLUON_TRITON_VERSIONS)


def kernel_set_for(x: torch.Tensor | None, adapter_dtype: torch.dtype | None, config: LoRAFusionConfig) -> str:
    """The kernel set of a site (single- or multi-adapter) whose input is ``x`` (example value) and
    whose adapters are ``adapter_dtype``: ``config.kernels`` unless it is ``"auto"``, which picks
    ``"torch"`` off CUDA (or without Triton), ``"gluon"`` for bf16 activations on a Hopper GPU when
    the step is CUDA-graph replayed (``config.cudagraphs``), and ``"triton"`` otherwise. Without
    graphs the Gluon launches' extra host work (TMA descriptors) outweighs their faster kernels
    (BENCHMARKS.md, fourteenth session). Never ``"gluon-gemms"``: at the power cap of a training
    step its GEMMs are slower (BENCHMARKS.md, twenty-second session)."""
    if config.kernels != "auto":
        return config.kernels
    on_cuda = x is not None and x.device.type == "cuda"
    dtypes_ok = x is not None and x.dtype in _TRITON_DTYPES and adapter_dtype in _TRITON_DTYPES
    if not (on_cuda and dtypes_ok and _triton_available()):
        return "torch"
    if config.cudagraphs and x.dtype == torch.bfloat16 and _gluon_available(x.device):
        return "gluon"
    return "triton"


def lorafusion_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """Dynamo backend: rewrite LoRA sites of ``gm``, then compile it with the inner backend."""
    config = LoRAFusionConfig.from_options(options)
    result = find_lora_sites(gm)
    kernels = [kernel_set_for(s.nodes.x.meta.get("example_value"), s.adapter_dtype, config) for s in result.sites]
    groups = shared_input_groups(gm.graph, result.sites, kernels) if config.rewrite and config.share_inputs else []
    if config.rewrite and result.sites:
        rewrite_lora_sites(gm, result.sites, kernels, deterministic=config.deterministic,
                           overlap_backward=config.overlap_backward, groups=groups)
    if config.rewrite:
        select_multi_kernels(gm, lambda x, a: kernel_set_for(x, None if a is None else a.dtype, config))
    publish(result.sites, result.skipped, kernels, [[result.sites[i].module_path for i in g] for g in groups])
    if config.dump_dir:
        from .dump import dump_kernels

        shared_rank = {i: sum(result.sites[j].rank for j in g) for g in groups for i in g}
        dump_kernels(config.dump_dir, result.sites, kernels, deterministic=config.deterministic, shared_rank=shared_rank)
    if config.inner_backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        from torch._inductor import config as inductor_config

        from .passes.cache_salt import SchemaSalt

        patches: dict[str, Any] = {"triton.cudagraphs": True} if config.cudagraphs else {}
        if inductor_config.post_grad_custom_post_pass is None:  # a user's own pass is left in place
            patches["post_grad_custom_post_pass"] = SchemaSalt()  # cache key follows our op schemas
        return compile_fx(gm, list(example_inputs), config_patches=patches)
    return torch._dynamo.lookup_backend(config.inner_backend)(gm, example_inputs)
