"""``lorafusion demo --adapters N``: N adapters, each learning its own shipped text, trained together.

Every step builds one batch holding ``batch`` sequences of each adapter's text (rows grouped
by adapter, an ``AdapterBatch`` routes them), runs the embedded tiny LLaMa once, and steps
each adapter's own optimizer on its own mean token loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..runtime import AdapterBatch, MultiAdapterModel
from .text_data import SHIPPED_TEXTS, byte_tokens, load_text, random_windows
from .tiny_llama import LORA_TARGETS, TinyLlamaConfig, build_tiny_llama

__all__ = ["MultiDemoResult", "run_multi_demo"]

_RANKS = (4, 8, 16, 8)


@dataclass
class MultiDemoResult:
    """Mean token loss (nats) per adapter per step, and wall time in seconds."""

    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def _build(texts: tuple[str, ...], dropout: float, seed: int) -> MultiAdapterModel:
    from peft import LoraConfig, get_peft_model

    base = build_tiny_llama(TinyLlamaConfig(), seed=seed)
    configs = [LoraConfig(r=_RANKS[i % len(_RANKS)], lora_alpha=2 * _RANKS[i % len(_RANKS)], lora_dropout=dropout, target_modules=list(LORA_TARGETS)) for i in range(len(texts))]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(base, configs[0], adapter_name=texts[0])
        for name, config in zip(texts[1:], configs[1:]):
            model.add_adapter(name, config)
    return MultiAdapterModel(model)


def run_multi_demo(*, adapters: int = 4, steps: int = 120, batch: int = 4, seq_len: int = 64, dropout: float = 0.05, lr: float = 1e-2,
                   compile: bool = True, seed: int = 0, progress: bool = True) -> MultiDemoResult:
    """Train ``adapters`` adapters (one per shipped text) together; returns each one's loss curve."""
    from tqdm.auto import tqdm

    if not 1 <= adapters <= len(SHIPPED_TEXTS):
        raise ValueError(f"adapters={adapters}: choose 1 to {len(SHIPPED_TEXTS)} (one per shipped text)")
    for name, value in (("steps", steps), ("batch", batch), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    texts = SHIPPED_TEXTS[:adapters]
    torch.manual_seed(seed)
    multi = _build(texts, dropout, seed)
    multi.train()
    optimizers = {name: torch.optim.AdamW(multi.adapter_parameters(name), lr=lr) for name in texts}
    tokens = {name: byte_tokens(load_text(name)) for name in texts}
    generator = torch.Generator().manual_seed(seed)
    routing = AdapterBatch.from_sequence_adapters([i for i in range(adapters) for _ in range(batch)], seq_len=seq_len, num_adapters=adapters)
    forward = torch.compile(multi, backend="lorafusion") if compile else multi
    result = MultiDemoResult(losses={name: [] for name in texts})
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"lorafusion demo ({adapters} adapters)", unit="step", disable=not progress)
    for _ in bar:
        ids = torch.cat([random_windows(tokens[name], batch=batch, seq_len=seq_len, generator=generator) for name in texts])
        logits = forward(routing, input_ids=ids).logits
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(adapters, -1)
        per_adapter = token_loss.mean(dim=1)  # each adapter's own mean token loss
        per_adapter.sum().backward()  # adapters share no parameters: each gets exactly its own gradient
        for name, loss in zip(texts, per_adapter.tolist()):
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            result.losses[name].append(loss)
        bar.set_postfix({name[:6]: f"{result.losses[name][-1]:.2f}" for name in texts})
    result.seconds = time.perf_counter() - start
    return result
