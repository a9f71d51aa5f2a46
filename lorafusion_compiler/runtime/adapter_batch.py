"""Adapter-tagged batches: which rows of a packed batch belong to which adapter.

A batch is laid out adapter by adapter: adapter i owns one contiguous range of rows
(tokens), padded to ``pad_multiple`` rows so a kernel row-block never holds two adapters.
The routing table is built once per batch, lives on the device, and is reused by every
layer of the model (no host sync per layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["AdapterBatch"]


@dataclass(frozen=True, kw_only=True)
class AdapterBatch:
    """Routing of the rows (tokens) of one batch to adapters."""

    adapter_rows: torch.Tensor
    """int64 [n_adapters, 2] on the device: (first row, row count) per adapter; count 0 = absent."""
    total_rows: int
    """Rows of the batch (tokens, padding included)."""
    pad_multiple: int
    """Each adapter's range starts at a multiple of this (the kernels' row block)."""

    @property
    def num_adapters(self) -> int:
        """Adapters in the routing table (including those with no rows in this batch)."""
        return int(self.adapter_rows.shape[0])

    @classmethod
    def from_counts(cls, counts: Sequence[int], *, pad_multiple: int = 1, device: torch.device | str | None = None) -> "AdapterBatch":
        """Adapter i gets ``counts[i]`` rows; ranges are laid out in adapter order, each padded.

        Example: counts (3, 0, 5) with pad_multiple 4 -> rows 0-2 adapter 0, 4-8 adapter 2, 12 rows.
        """
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple={pad_multiple} must be >= 1")
        if not counts:
            raise ValueError("an AdapterBatch needs at least one adapter")
        table, start = [], 0
        for i, count in enumerate(counts):
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"adapter {i} has row count {count!r}; counts must be non-negative ints")
            table.append((start if count else 0, count))
            start += -(-count // pad_multiple) * pad_multiple
        rows = torch.tensor(table, dtype=torch.int64).to(device) if device is not None else torch.tensor(table, dtype=torch.int64)
        return cls(adapter_rows=rows, total_rows=start, pad_multiple=pad_multiple)

    @classmethod
    def from_sequence_adapters(cls, seq_adapter: Sequence[int], *, seq_len: int, num_adapters: int, device: torch.device | str | None = None) -> "AdapterBatch":
        """Routing for a [batch, seq_len] input where sequence b belongs to ``seq_adapter[b]``.

        Sequences must be grouped by adapter (all of adapter i adjacent, in adapter order):
        sort the batch with ``order = sorted(range(B), key=seq_adapter.__getitem__)`` first.
        """
        for b, adapter in enumerate(seq_adapter):
            if not 0 <= adapter < num_adapters:
                raise ValueError(f"sequence {b} names adapter {adapter}, but there are {num_adapters} adapters (ids 0..{num_adapters - 1})")
        if list(seq_adapter) != sorted(seq_adapter):
            raise ValueError(f"sequences must be grouped by adapter in ascending order, got {list(seq_adapter)}; sort the batch first")
        counts = [sum(1 for a in seq_adapter if a == i) * seq_len for i in range(num_adapters)]
        return cls.from_counts(counts, pad_multiple=seq_len, device=device)

    def row_adapter(self) -> torch.Tensor:
        """int64 [total_rows]: the adapter of each row, -1 for padding rows (host tensor)."""
        owner = torch.full((self.total_rows,), -1, dtype=torch.int64)
        for i, (start, count) in enumerate(self.adapter_rows.tolist()):
            owner[start : start + count] = i
        return owner

    def to(self, device: torch.device | str) -> "AdapterBatch":
        """The same routing with its table on ``device``."""
        return AdapterBatch(adapter_rows=self.adapter_rows.to(device), total_rows=self.total_rows, pad_multiple=self.pad_multiple)
