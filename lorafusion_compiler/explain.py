"""``lorafusion.explain``: which layers the backend rewrites, without training anything."""

from __future__ import annotations

from typing import Any

import torch

from .report import ExplainReport, collect_reports

__all__ = ["explain"]


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> ExplainReport:
    """Trace ``model(*example_inputs)`` with the lorafusion backend and report its LoRA sites.

    The model runs once (forward only, no gradients); nothing is compiled by Inductor:
    the graphs run eagerly. ``options`` are backend options (see ``LoRAFusionConfig``);
    ``inner_backend`` defaults to ``"eager"`` here.

    Returns:
        An :class:`ExplainReport`: ``.matched`` (sites with ``.module_path``, ``.rank``,
        ``.dropout_p``, ``.scale``, shapes), ``.skipped`` (``.module_path``, ``.reason``);
        ``str(report)`` is a table.
    """
    from .backend import lorafusion_backend

    options = {"inner_backend": "eager", **options}

    def backend(gm, inputs):
        return lorafusion_backend(gm, inputs, options)

    compiled = torch.compile(model, backend=backend, dynamic=False)
    with collect_reports() as report, torch.no_grad():
        compiled(*example_inputs)
    return report
