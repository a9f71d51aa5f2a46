"""Text shipped inside the package, as byte-level token windows (no tokenizer, no downloads)."""

from __future__ import annotations

from importlib import resources

import torch

__all__ = ["SHIPPED_TEXTS", "load_text", "byte_tokens", "random_windows"]

SHIPPED_TEXTS = ("tales", "recipes", "code", "facts")
"""Names of the texts in ``lorafusion/data`` (one file ``<name>.txt`` each)."""


def load_text(name: str) -> str:
    """The shipped text ``name`` (one of ``SHIPPED_TEXTS``)."""
    if name not in SHIPPED_TEXTS:
        raise ValueError(f"unknown shipped text {name!r}; choose one of {SHIPPED_TEXTS}")
    return resources.files("lorafusion").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor of token ids in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def random_windows(tokens: torch.Tensor, *, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, seq_len]`` windows cut at random offsets from a 1-D token tensor."""
    if tokens.numel() < seq_len:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
