"""``lorafusion demo``: fine-tune a LoRA adapter on the embedded tiny LLaMa, compiled with our backend."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..explain import explain
from .text_data import byte_tokens, load_text, random_windows
from .tiny_llama import TinyLlamaConfig, add_lora, build_tiny_llama

__all__ = ["DemoOptions", "DemoResult", "run_demo"]


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What the demo trains."""

    steps: int = 120
    """Optimizer steps."""
    batch: int = 8
    """Sequences per step."""
    seq_len: int = 64
    """Tokens (bytes) per sequence."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha (scale = alpha / rank)."""
    dropout: float = 0.05
    """LoRA dropout probability."""
    lr: float = 1e-2
    """AdamW learning rate."""
    text: str = "tales"
    """Shipped text to learn (see ``text_data.SHIPPED_TEXTS``)."""
    compile: bool = True
    """Compile with ``backend="lorafusion"`` (False: eager PEFT, for comparison)."""
    seed: int = 0
    """Seed of the model, the adapter and the data order."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")


@dataclass
class DemoResult:
    """Losses per step (nats per token) and the explain report of the compiled model."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    report: object | None = None


def run_demo(options: DemoOptions | None = None, *, progress: bool = True) -> DemoResult:
    """Train one LoRA adapter on a shipped text; returns the loss curve."""
    from tqdm.auto import tqdm

    options = options or DemoOptions()
    torch.manual_seed(options.seed)
    model = add_lora(build_tiny_llama(TinyLlamaConfig(), seed=options.seed), rank=options.rank, alpha=options.alpha, dropout=options.dropout, seed=options.seed)
    model.train()
    tokens = byte_tokens(load_text(options.text))
    generator = torch.Generator().manual_seed(options.seed)
    batches = [random_windows(tokens, batch=options.batch, seq_len=options.seq_len, generator=generator) for _ in range(options.steps)]
    result = DemoResult()
    if options.compile:
        result.report = explain(model, batches[0])
    step_fn = torch.compile(model, backend="lorafusion") if options.compile else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    start = time.perf_counter()
    bar = tqdm(batches, desc="lorafusion demo", unit="step", disable=not progress)
    for batch in bar:
        loss = step_fn(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    result.seconds = time.perf_counter() - start
    return result
