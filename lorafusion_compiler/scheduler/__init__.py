"""Multi-adapter scheduler: pack the samples of many LoRA jobs into fixed-capacity
microbatches for a pipelined shared base model, verify and simulate the plan.

Entry point: :func:`schedule` (see ``docs/scheduler.md``).
"""

from .cli import add_schedule_subcommand
from .distributions import DISTRIBUTIONS, MIXES, LengthDistribution, sample_lengths, synthetic_jobs
from .jobfile import JobsFile, load_jobs_file
from .jobs import Item, Job
from .microbatch import Microbatch
from .plan import Schedule, ScheduleConfig, ScheduleStats, schedule
from .simulator import SimulationResult, StageCosts, simulate
from .verify import ScheduleError, verify_schedule

__all__ = [
    "DISTRIBUTIONS",
    "MIXES",
    "Item",
    "Job",
    "JobsFile",
    "LengthDistribution",
    "Microbatch",
    "Schedule",
    "ScheduleConfig",
    "ScheduleError",
    "ScheduleStats",
    "SimulationResult",
    "StageCosts",
    "add_schedule_subcommand",
    "load_jobs_file",
    "sample_lengths",
    "schedule",
    "simulate",
    "synthetic_jobs",
    "verify_schedule",
]
