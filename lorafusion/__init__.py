"""lorafusion: fast LoRA fine-tuning through ``torch.compile(model, backend="lorafusion")``.

Public API:

* ``torch.compile(model, backend="lorafusion", options={...})`` — the backend (no import needed);
* :func:`explain` — which layers the backend rewrites, as a report;
* :class:`LoRAFusionConfig` — the backend's options.
"""

from lorafusion_compiler.config import LoRAFusionConfig
from lorafusion_compiler.explain import explain
from lorafusion_compiler.report import ExplainReport

__version__ = "0.1.0"

__all__ = ["LoRAFusionConfig", "ExplainReport", "explain", "__version__"]
