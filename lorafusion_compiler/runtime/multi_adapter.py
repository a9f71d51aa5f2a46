"""Train several PEFT adapters of one model at once, each on its own rows of a batch.

    model = get_peft_model(base, LoraConfig(...), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=32, ...))
    multi = MultiAdapterModel(model)                      # adapters in order: ["a", "b"]
    batch = AdapterBatch.from_sequence_adapters([0, 0, 1], seq_len=T, num_adapters=2)
    loss = multi(batch, input_ids=ids, labels=ids).loss   # rows of "a" train "a", rows of "b" train "b"

Every PEFT ``lora.Linear`` is routed through ``torch.ops.lorafusion.multi_lora_linear``; the
parameters stay PEFT's own (``save_pretrained`` works unchanged). Eagerly the op loops over
adapters (the reference); under ``torch.compile(..., backend="lorafusion")`` the backend
switches it to the fused kernels where they apply.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from ..ops.multi_lora_linear import multi_lora_linear
from .adapter_batch import AdapterBatch

__all__ = ["MultiAdapterModel"]


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _routed_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a PEFT lora.Linear that routes rows to adapters (``layer._lorafusion_rows``)."""
    names = layer._lorafusion_adapters
    base = layer.get_base_layer()
    ps = [_dropout_p(layer.lora_dropout[n]) if layer.training else 0.0 for n in names]
    y, _, _ = multi_lora_linear(
        x,
        base.weight,
        base.bias,
        [layer.lora_A[n].weight for n in names],
        [layer.lora_B[n].weight for n in names],
        [float(layer.scaling[n]) for n in names],
        ps,
        layer._lorafusion_rows,
        x.dtype,  # PEFT casts the sum back to the base layer's dtype
        "torch",
        False,
        None,  # routing tables: the backend adds a shared multi_routing node when it picks the fused kernels
    )
    return y


class MultiAdapterModel(nn.Module):
    """Routes each row range of a batch to one adapter of a PEFT model (see module docstring)."""

    def __init__(self, peft_model: nn.Module, *, adapters: list[str] | None = None):
        super().__init__()
        from peft.tuners.lora import Linear as LoraLinear

        self.peft_model = peft_model
        names = list(adapters) if adapters is not None else list(peft_model.peft_config)
        if not names:
            raise ValueError("the PEFT model has no adapters; add them with add_adapter() first")
        self.adapter_names = names
        self._layers = []
        for path, module in peft_model.named_modules():
            if not isinstance(module, LoraLinear):
                continue
            missing = [n for n in names if n not in module.lora_A]
            if missing:
                raise ValueError(f"layer {path} has no adapter(s) {missing}; every adapter must target the same modules")
            module._lorafusion_adapters = names
            module._lorafusion_rows = None
            module.forward = types.MethodType(_routed_forward, module)
            self._layers.append(module)
        if not self._layers:
            raise ValueError("no PEFT lora.Linear layers found in the model")
        for name in names:  # every adapter trains: PEFT marks only the active one trainable
            for param_name, param in peft_model.named_parameters():
                if f".{name}." in param_name and "lora_" in param_name:
                    param.requires_grad_(True)

    def forward(self, batch: AdapterBatch, *args: Any, **kwargs: Any) -> Any:
        """Run the PEFT model with rows routed by ``batch``; other arguments go to the model."""
        if batch.num_adapters != len(self.adapter_names):
            raise ValueError(f"batch routes {batch.num_adapters} adapters, the model has {len(self.adapter_names)}: {self.adapter_names}")
        for layer in self._layers:
            layer._lorafusion_rows = batch.adapter_rows
        return self.peft_model(*args, **kwargs)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of adapter ``name`` (for a per-adapter optimizer)."""
        if name not in self.adapter_names:
            raise ValueError(f"unknown adapter {name!r}; adapters are {self.adapter_names}")
        return [p for n, p in self.peft_model.named_parameters() if f".{name}." in n and "lora_" in n]
