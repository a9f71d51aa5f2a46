"""Process-group setup and failure propagation for the multi-rank pipeline.

``init_distributed`` joins (or reuses) the default process group: NCCL when CUDA is
available, gloo otherwise; one rank = one pipeline stage. ``FailureWatch`` makes a failure
on any rank stop every rank: the failing rank writes ``"rank r: Type: message"`` into the
process group's key-value store; a watchdog thread on every rank polls that key and, when
another rank failed, interrupts the main thread (``RemoteRankError`` carrying the remote
message) and, if the main thread is stuck inside a collective, ends the process with exit
code 1 after ``grace_s`` seconds (the message is printed to stderr first).
"""

from __future__ import annotations

import _thread
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["ERROR_KEY", "DistInfo", "FailureWatch", "RemoteRankError", "free_port", "init_distributed"]

ERROR_KEY = "lorafusion/pipeline/error"


class RemoteRankError(RuntimeError):
    """Another rank of the pipeline failed; the message names the rank and its error."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its device, and whether a group is up."""

    rank: int
    world_size: int
    device: torch.device
    active: bool


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_device(rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` (``rank`` without that variable) when CUDA is available, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return torch.device(f"cuda:{local % torch.cuda.device_count()}")


def init_distributed(*, backend: str | None = None, timeout_s: float = 300.0, device: torch.device | str | None = None) -> DistInfo:
    """Join the default process group from torchrun's env (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) unless one exists; without ``WORLD_SIZE`` > 1 return a single-process info.

    ``timeout_s`` bounds every collective (seconds). The device is ``device`` if given, else
    ``cuda:LOCAL_RANK`` when CUDA is available, else CPU. The backend (unless given) follows the
    device: NCCL for CUDA, gloo for CPU, so ``device="cpu"`` runs on gloo on a GPU machine too.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized() and world > 1:
        device = torch.device(device) if device is not None else _default_device(int(os.environ.get("RANK", "0")))
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(device) if device is not None else _default_device(rank)
    return DistInfo(rank=rank, world_size=world, device=device, active=dist.is_initialized() and world > 1)


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()  # private; pinned to torch 2.11-2.13


class FailureWatch:
    """Context manager around a rank's training loop (see module docstring).

    Inside: a local exception is published and re-raised; a remote one surfaces as
    ``RemoteRankError`` (or the process exits with code 1 after ``grace_s`` seconds if the
    main thread cannot be interrupted). ``poll_s``: seconds between store polls.
    """

    def __init__(self, info: DistInfo, *, poll_s: float = 0.2, grace_s: float = 10.0):
        self.info, self.poll_s, self.grace_s = info, poll_s, grace_s
        self._stop = threading.Event()
        self._remote: str | None = None
        self._thread: threading.Thread | None = None
        self._store = _store() if info.active else None

    def _remote_error(self) -> str | None:
        try:
            if self._store.check([ERROR_KEY]):
                return self._store.get(ERROR_KEY).decode()
        except Exception:  # noqa: BLE001 - store gone: the master rank (0) has exited
            return "rank 0 exited (the process group's store is unreachable)"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            message = self._remote_error()
            if message is None or message.startswith(f"rank {self.info.rank}:"):
                continue
            self._remote = message
            print(f"[lorafusion rank {self.info.rank}] stopping: {message}", file=sys.stderr, flush=True)
            _thread.interrupt_main()
            if not self._stop.wait(self.grace_s):
                print(f"[lorafusion rank {self.info.rank}] main thread stuck; exiting after remote failure: {message}", file=sys.stderr, flush=True)
                os._exit(1)
            return

    def __enter__(self) -> FailureWatch:  # noqa: PYI034
        if self._store is not None:
            self._thread = threading.Thread(target=self._watch, name="lorafusion-failure-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if exc is None or self._store is None:
            return False
        if self._remote is None and not isinstance(exc, KeyboardInterrupt):
            # our error, unless a peer failed first and this is the fallout (closed connection)
            deadline = time.monotonic() + 2.0
            while self._remote is None and time.monotonic() < deadline:
                message = self._remote_error()
                if message is not None and not message.startswith(f"rank {self.info.rank}:") and "unreachable" not in message:
                    self._remote = message
                    break
                time.sleep(self.poll_s / 2)
            if self._remote is None:
                try:
                    self._store.compare_set(ERROR_KEY, "", f"rank {self.info.rank}: {type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001, S110 - best effort: the store may be gone already
                    pass
                if self.info.rank == 0:  # rank 0 hosts the store: give peers time to read the error
                    time.sleep(min(self.grace_s, 10 * self.poll_s))
                return False
        if self._remote is not None:
            raise RemoteRankError(self._remote) from exc
        return False
