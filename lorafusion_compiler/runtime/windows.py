"""Rounds and windows: how the scheduler's ordered microbatches are run and checkpointed.

Positions: the scheduler's microbatches in order with its no-ops dropped; position ``p`` is
the RNG key of microbatch ``p`` and never changes for a plan (resume included).

**Round**: a run of positions holding whole optimizer steps. The sequence is cut at every
position that no ``(job, step)`` straddles, so after a round every step it touched has
finished and no gradient is half accumulated. Rounds are the unit of progress:
checkpoints, ``next_round`` on resume, ``max_rounds``.

**Window**: microbatches run as one ``Schedule1F1B`` step (one fill, one drain). A window
holds whole rounds up to ``window_microbatches`` microbatches; a longer round is split over
several windows (such inner cuts are no resume points). Windows end where the caller needs
a round boundary (``cuts``). Inside a window optimizer steps are lazy: stage ``s`` applies
job ``j``'s step ``t`` right before its first forward of step ``t + 1``.

**Distance rule**: 1F1B with ``S`` stages runs the forward of microbatch ``k`` on stage 0
after the backward of microbatch ``k - S`` (its steady state alternates F(k), B(k - S)).
So the first microbatch of step ``t + 1`` must come at least ``S`` window positions after
the last microbatch of step ``t`` of the same job, or stage 0 would wait on its own future
backward. Where the order breaks this, empty padding microbatches (all padding tokens) are
inserted; when the window has no room left for them, the window is cut there instead
(a window end applies every finished step). Each window is padded to >= ``S``
microbatches at its end (1F1B needs as many microbatches as stages).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from .packer import Item

__all__ = ["Round", "Step", "Window", "plan_rounds", "plan_windows"]

Step = tuple[str, int]
"""``(job_name, step)``: one optimizer step of one job."""


@dataclass(kw_only=True)
class Round:
    """Positions ``start .. start + len(microbatches) - 1``, holding whole steps."""

    start: int
    """Position of the first microbatch."""
    microbatches: list[list[Item]]
    """Items per microbatch (none empty)."""
    finished: list[Step]
    """Every step held by the round (all finish in it), ordered by their last position."""


@dataclass(kw_only=True)
class Window:
    """Microbatches run as one pipeline schedule step; index ``k`` = k-th microbatch of the window."""

    microbatches: list[list[Item]]
    """Items per microbatch in run order; ``[]`` = padding (all padding tokens)."""
    positions: list[int | None]
    """Plan position of each microbatch (its RNG key), None for padding."""
    finishes: dict[int, list[Step]] = field(default_factory=dict)
    """k -> steps whose last microbatch is k (their gradient is complete after its backward)."""
    requires: dict[int, list[Step]] = field(default_factory=dict)
    """k -> steps finished earlier in this window that must be applied before k's forward."""
    end_round: int | None = None
    """Rounds done after this window, or None when it ends inside a round (no resume point)."""

    @property
    def padding(self) -> int:
        """Padding microbatches inserted (distance rule and minimum length)."""
        return sum(p is None for p in self.positions)

    def check_distance(self, stages: int) -> None:
        """Raise ValueError unless every lazy step is >= ``stages`` positions before its use."""
        last = {step: k for k, steps in self.finishes.items() for step in steps}
        for k, steps in sorted(self.requires.items()):
            for job, step in steps:
                if (job, step) not in last or k - last[job, step] < stages:
                    at = last.get((job, step))
                    raise ValueError(
                        f"window microbatch {k} starts step {step + 1} of job {job!r} but step {step} ends at "
                        f"microbatch {at}: 1F1B with {stages} stages needs a distance >= {stages} (plan bug)")
        if len(self.microbatches) < stages:
            raise ValueError(f"window has {len(self.microbatches)} microbatches; 1F1B with {stages} stages needs >= {stages}")


def plan_rounds(microbatches: Sequence[Sequence[Item]]) -> list[Round]:
    """Cut the scheduler's ordered microbatches (no-ops are dropped) into rounds of whole steps.

    Raises ValueError if a microbatch holds two steps of one job or a job's step starts
    before its previous step's last microbatch.
    """
    mbs = [[tuple(item) for item in mb] for mb in microbatches if mb]
    first: dict[Step, int] = {}
    last: dict[Step, int] = {}
    for p, mb in enumerate(mbs):
        held: dict[str, int] = {}
        for job, step, _ in mb:
            if held.setdefault(job, step) != step:
                raise ValueError(f"the microbatch at position {p} holds steps {held[job]} and {step} of job {job!r}; "
                                 "a microbatch may hold one step per job")
            first.setdefault((job, step), p)
            last[job, step] = p
    for (job, step), p in first.items():
        if (job, step - 1) in last and last[job, step - 1] >= p:
            raise ValueError(f"schedule violates step order: job {job!r} step {step} starts at position {p}, "
                             f"before step {step - 1} ends at position {last[job, step - 1]} (positions skip no-ops)")
    rounds: list[Round] = []
    start, reach = 0, -1
    for p, mb in enumerate(mbs):
        reach = max([reach, *(last[job, step] for job, step, _ in mb)])
        if reach == p:  # no step straddles position p + 1
            steps = sorted({(job, step) for q in range(start, p + 1) for job, step, _ in mbs[q]},
                           key=lambda s: (last[s], s))
            rounds.append(Round(start=start, microbatches=mbs[start : p + 1], finished=steps))
            start = p + 1
    return rounds


def _waits(finished_at: dict[Step, int], mb: Sequence[Item]) -> list[Step]:
    """Steps finished in the window whose next step ``mb`` holds."""
    return sorted({(job, step - 1) for job, step, _ in mb if (job, step - 1) in finished_at})


def _padding(finished_at: dict[Step, int], length: int, waits: Sequence[Step], stages: int) -> int:
    """Empty microbatches to insert at window index ``length`` so every wait is >= ``stages`` back."""
    return max([0, *(finished_at[s] + stages - length for s in waits)])


class _Builder:
    """The window being filled: microbatches, their positions and the lazy-step tables."""

    def __init__(self, stages: int):
        self.stages = stages
        self.microbatches: list[list[Item]] = []
        self.positions: list[int | None] = []
        self.finishes: dict[int, list[Step]] = {}
        self.requires: dict[int, list[Step]] = {}
        self.finished_at: dict[Step, int] = {}
        self.required: set[Step] = set()

    def __len__(self) -> int:
        return len(self.microbatches)

    def add(self, mb: list[Item], position: int, done: Sequence[Step], padding: int) -> None:
        """Append ``padding`` empty microbatches, then ``mb``; ``done``: steps whose last microbatch it is."""
        waits = [s for s in _waits(self.finished_at, mb) if s not in self.required]  # first microbatch of the next step
        self.required.update(waits)
        self.microbatches += [[] for _ in range(padding)] + [mb]
        self.positions += [None] * padding + [position]
        k = len(self) - 1
        if waits:
            self.requires[k] = waits
        if done:
            self.finishes[k] = list(done)
            self.finished_at.update((step, k) for step in done)

    def close(self, end_round: int | None) -> Window:
        """The window built so far, padded to >= ``stages`` microbatches; the builder restarts empty."""
        extra = max(0, self.stages - len(self))
        window = Window(microbatches=self.microbatches + [[] for _ in range(extra)], positions=self.positions + [None] * extra,
                        finishes=self.finishes, requires=self.requires, end_round=end_round)
        self.__init__(self.stages)
        return window


def _round_length(builder: _Builder, rnd: Round, ends: dict[int, list[Step]]) -> int:
    """Microbatches (padding included) that ``rnd`` would add to ``builder``'s window."""
    finished_at, length = dict(builder.finished_at), len(builder)
    for offset, mb in enumerate(rnd.microbatches):
        length += _padding(finished_at, length, _waits(finished_at, mb), builder.stages) + 1
        finished_at.update((step, length - 1) for step in ends.get(rnd.start + offset, []))
    return length - len(builder)


def plan_windows(rounds: Sequence[Round], *, stages: int, window_microbatches: int | None, first_round: int = 0,
                 cuts: Collection[int] = ()) -> list[Window]:
    """Group ``rounds`` (rounds ``first_round ..`` of the plan) into windows (module docstring).

    window_microbatches: most microbatches per window (>= ``stages``), or None for one round
    per window; cuts: round indices before which a window must end (checkpoints, stops).
    """
    if window_microbatches is not None and (isinstance(window_microbatches, bool) or not isinstance(window_microbatches, int)
                                            or window_microbatches < stages):
        raise ValueError(f"window_microbatches={window_microbatches!r} must be an integer >= the number of stages ({stages})")
    ends: dict[int, list[Step]] = {}
    for rnd in rounds:
        last = {}
        for offset, mb in enumerate(rnd.microbatches):
            for job, step, _ in mb:
                last[job, step] = rnd.start + offset
        for step in rnd.finished:
            ends.setdefault(last[step], []).append(step)
    windows: list[Window] = []
    builder = _Builder(stages)
    for r, rnd in enumerate(rounds, start=first_round):
        if len(builder) and (window_microbatches is None or r in cuts
                             or len(builder) + _round_length(builder, rnd, ends) > window_microbatches):
            windows.append(builder.close(end_round=r))
        for offset, mb in enumerate(rnd.microbatches):
            padding = _padding(builder.finished_at, len(builder), _waits(builder.finished_at, mb), stages)
            if window_microbatches is not None and len(builder) and len(builder) + padding + 1 > window_microbatches:
                windows.append(builder.close(end_round=None))  # full: cut here instead of padding
                padding = 0
            builder.add(list(mb), rnd.start + offset, ends.get(rnd.start + offset, []), padding)
    if len(builder):
        windows.append(builder.close(end_round=first_round + len(rounds)))
    for window in windows:
        window.check_distance(stages)
    return windows
