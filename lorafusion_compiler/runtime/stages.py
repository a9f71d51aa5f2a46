"""Cut a decoder-only causal LM into pipeline stages by hand (module slices, tensors only).

Supported models: HF decoder-only LMs laid out like LLaMa/Mistral/Qwen2 (``model.embed_tokens``,
``model.layers``, ``model.norm``, ``model.rotary_emb``, ``lm_head``), bare or wrapped in PEFT.
Stage ``s`` of ``S`` owns a contiguous range of decoder layers; stage 0 also owns the
embedding, stage ``S - 1`` the final norm and ``lm_head``. Between stages only the hidden
states travel (float [1, C, H]); the per-microbatch routing (adapter rows), position ids and
block-causal mask (built from sample ids) are rebuilt on every stage from the runtime packer's plan, which every rank
computes identically (see ``StageModule.feed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .packer import PackedMicrobatch, block_causal_mask

__all__ = ["DecoderParts", "StageContext", "StageModule", "balance_stages", "decoder_parts", "layer_costs"]


@dataclass
class DecoderParts:
    """The blocks of a decoder-only LM, in execution order."""

    embed: nn.Module
    layers: Sequence[nn.Module]
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Find embed/layers/norm/lm_head/rotary in an HF causal LM (PEFT wrappers are unwrapped)."""
    inner = next((m for m in model.modules() if "lm_head" in m._modules and "model" in m._modules), None)
    body = inner._modules["model"] if inner is not None else None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or not all(n in body._modules for n in needed):
        raise ValueError(
            f"cannot cut {type(model).__name__} into stages: expected an HF decoder-only LM with "
            "model.embed_tokens, model.layers, model.norm, model.rotary_emb and lm_head (LLaMa-style)"
        )
    return DecoderParts(embed=body.embed_tokens, layers=list(body.layers), norm=body.norm, lm_head=inner.lm_head, rotary=body.rotary_emb)


def layer_costs(parts: DecoderParts) -> list[float]:
    """Estimated cost per decoder layer (parameters ~ FLOPs per token); the last stage also
    pays ``lm_head`` (its parameter count is added to the last layer's share by ``balance_stages``)."""
    return [float(sum(p.numel() for p in layer.parameters())) for layer in parts.layers]


def balance_stages(costs: Sequence[float], stages: int, *, tail_cost: float = 0.0) -> list[tuple[int, int]]:
    """Split layers ``0..L-1`` into ``stages`` contiguous non-empty ranges minimising the
    largest stage cost (exact DP); ``tail_cost`` is added to the last stage (lm_head + loss)."""
    n = len(costs)
    if stages < 1 or stages > n:
        raise ValueError(f"cannot cut {n} decoder layers into {stages} stages; use 1..{n} stages (each stage needs a layer)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for end in range(s, n + 1):
            for start in range(s - 1, end):
                load = prefix[end] - prefix[start] + (tail_cost if (s == stages and end == n) else 0.0)
                value = max(best[s - 1][start], load)
                if value < best[s][end]:
                    best[s][end], cut[s][end] = value, start
    ranges, end = [], n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


@dataclass
class StageContext:
    """Per-microbatch side inputs of every stage (all on the stage's device)."""

    position_ids: torch.Tensor
    """int64 [1, C]."""
    sample_ids: torch.Tensor
    """int64 [1, C]; the [1, 1, C, C] block-causal mask is built from it when the microbatch runs."""
    adapter_rows: torch.Tensor
    """int64 [J, 2] routing table."""

    @classmethod
    def from_microbatch(cls, mb: PackedMicrobatch, *, device: torch.device) -> StageContext:
        return cls(position_ids=mb.position_ids.to(device), sample_ids=mb.sample_ids.to(device), adapter_rows=mb.routing.adapter_rows.to(device))


class StageModule(nn.Module):
    """Layers ``start..end-1`` of a decoder LM (+ embedding on the first, norm + lm_head on the last).

    ``forward(x)``: x = input ids int64 [1, C] on the first stage, hidden states [1, C, H]
    elsewhere; returns hidden states [1, C, H], or logits [1, C, V] on the last stage. The
    k-th call after ``feed(contexts)`` uses ``contexts[k]`` (1F1B runs forwards in microbatch
    order on every stage).
    """

    def __init__(self, parts: DecoderParts, start: int, end: int, *, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.start, self.end = start, end
        self.embed = parts.embed if first else None
        self.layers = nn.ModuleList(parts.layers[start:end])
        self.norm = parts.norm if last else None
        self.lm_head = parts.lm_head if last else None
        self.rotary = parts.rotary
        self._routed = [m for m in self.modules() if hasattr(m, "_lorafusion_adapters")]
        self.dtype = parts.embed.weight.dtype
        """Model dtype (attention mask dtype)."""
        self._contexts: list[StageContext] = []
        self._next = 0
        self._run = self._compute

    def compile_compute(self, **options) -> None:
        """Compile the per-microbatch compute (``torch.compile(..., **options)``)."""
        self._run = torch.compile(self._compute, **options)

    def feed(self, contexts: list[StageContext]) -> None:
        """Side inputs of the next ``len(contexts)`` forwards."""
        self._contexts, self._next = list(contexts), 0

    @property
    def consumed(self) -> int:
        """Forwards run since the last ``feed``."""
        return self._next

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._next >= len(self._contexts):
            raise RuntimeError(f"stage layers {self.start}..{self.end - 1}: forward #{self._next} has no context; call feed() first")
        ctx = self._contexts[self._next]
        self._next += 1
        mask = block_causal_mask(ctx.sample_ids, self.dtype)  # built per forward: only in-flight microbatches hold one
        return self._run(x, ctx.position_ids, mask, ctx.adapter_rows)

    def _compute(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, adapter_rows: torch.Tensor) -> torch.Tensor:
        for layer in self._routed:
            layer._lorafusion_rows = adapter_rows
        h = self.embed(x) if self.first else x
        position_embeddings = self.rotary(h, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
            if isinstance(h, tuple):  # transformers 4.x layers return a tuple
                h = h[0]
        if self.last:
            h = self.lm_head(self.norm(h))
        return h
