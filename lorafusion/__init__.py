"""lorafusion: fast LoRA fine-tuning through ``torch.compile(model, backend="lorafusion")``.

Public API:

* ``torch.compile(model, backend="lorafusion", options={...})`` — the backend (no import needed
  where the package is installed: its entry point names it; importing ``lorafusion`` names it too,
  e.g. in a checkout on ``PYTHONPATH`` that was never ``pip install``-ed);
* :func:`explain` — which layers the backend rewrites, as a report;
* :class:`LoRAFusionConfig` — the backend's options;
* :func:`schedule`, :class:`Job`, :class:`Schedule` — plan many LoRA jobs into microbatches;
* :class:`MultiAdapterModel`, :class:`AdapterBatch` — train several adapters of one model at once;
* :func:`pipeline`, :class:`PipelineJob` — train many LoRA jobs together (1F1B across GPUs).
"""

from lorafusion_compiler.config import LoRAFusionConfig
from lorafusion_compiler.explain import explain
from lorafusion_compiler.report import ExplainReport
from lorafusion_compiler.runtime import AdapterBatch, MultiAdapterModel, PipelineJob, PipelineResult, pipeline
from lorafusion_compiler.scheduler import Job, Schedule, schedule

__version__ = "0.1.0"


def _name_the_backend() -> None:
    """Register ``backend="lorafusion"`` with Dynamo unless the installed entry point names it
    (reads the entry points only: ``torch._dynamo.list_backends`` would import every backend)."""
    from importlib.metadata import entry_points

    if "lorafusion" in entry_points(group="torch_dynamo_backends").names:
        return
    import torch._dynamo

    from lorafusion_compiler.backend import lorafusion_backend

    torch._dynamo.register_backend(compiler_fn=lorafusion_backend, name="lorafusion")


_name_the_backend()

__all__ = [
    "AdapterBatch",
    "ExplainReport",
    "Job",
    "LoRAFusionConfig",
    "MultiAdapterModel",
    "PipelineJob",
    "PipelineResult",
    "Schedule",
    "__version__",
    "explain",
    "pipeline",
    "schedule",
]
