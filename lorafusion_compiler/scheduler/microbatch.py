"""The microbatch record: what the pipeline runs at one position of a schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

from .jobs import Item, round_up

__all__ = ["Microbatch"]


@dataclass(kw_only=True)
class Microbatch:
    """One pipeline microbatch: samples of one or more jobs packed under the token capacity.

    A no-op microbatch (``is_noop``) holds no samples; it only keeps two steps of one job
    far enough apart in the 1F1B order and costs no compute.
    """

    items: list[Item] = field(default_factory=list)
    """Samples as ``(job_name, step, sample_index)``, sorted; empty for a no-op."""
    padded_tokens: int = 0
    """Sum over items of the sample length rounded up to the padding multiple (tokens)."""
    tokens: int = 0
    """Sum of the unpadded sample lengths (tokens)."""

    @property
    def is_noop(self) -> bool:
        """True for a placeholder microbatch without samples."""
        return not self.items

    @property
    def job_steps(self) -> list[tuple[str, int]]:
        """Distinct ``(job_name, step)`` pairs held by this microbatch, sorted."""
        return sorted({(job, step) for job, step, _ in self.items})

    def job_padded_tokens(self, lengths: dict[str, tuple[int, ...]], pad_multiple: int) -> dict[str, int]:
        """Padded tokens per job in this microbatch (tokens), keyed by job name."""
        shares: dict[str, int] = {}
        for job, _, index in self.items:
            shares[job] = shares.get(job, 0) + round_up(lengths[job][index], pad_multiple)
        return shares
