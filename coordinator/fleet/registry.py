"""Registered shard workers: where they are, what they offer, when they were last heard from."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from coordinator.fleet.planner import StagePlan
from coordinator.fleet.states import UNPLANNABLE, WORKER_TRANSITIONS, WorkerState, moved


@dataclass(frozen=True)
class WorkerDevice:
    """Where a worker computes, as it registered (RegisterWorkerRequest 80-85)."""

    device: str = "cpu"            # "cpu" or "cuda:N"
    name: str = ""
    memory_total_bytes: int = 0
    memory_free_bytes: int = 0
    dtype: str = ""                # its --dtype ("" = each LoadShard's)
    engine: str = "torch"


@dataclass
class WorkerRecord:
    worker_id: str
    address: str
    memory_budget_bytes: int
    last_heartbeat: float
    state: WorkerState = WorkerState.REGISTERED  # moves along fleet/states.py's WORKER_TRANSITIONS
    stage: StagePlan | None = None
    last_error: str = ""
    owner: str = ""  # the replica it belongs to ("" = free, in the pool)
    device: WorkerDevice = WorkerDevice()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            value = WorkerState(value)  # a name that is no state is a programming error: ValueError
            if "state" in self.__dict__:  # a move, not the first assignment
                moved(f"worker {self.worker_id} ({self.address})", WORKER_TRANSITIONS, self.__dict__["state"], value)
        super().__setattr__(name, value)


__all__ = ["UNPLANNABLE", "Registry", "WorkerDevice", "WorkerRecord"]


class Registry:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.workers: dict[str, WorkerRecord] = {}
        self._ids = itertools.count(1)

    def register(self, address: str, memory_budget_bytes: int, device: WorkerDevice | None = None) -> WorkerRecord:
        """A worker that registers again at the same address replaces its old record."""
        for worker_id, record in list(self.workers.items()):
            if record.address == address:
                del self.workers[worker_id]
        record = WorkerRecord(f"w{next(self._ids)}", address, memory_budget_bytes, time.monotonic(),
                              device=device or WorkerDevice())
        self.workers[record.worker_id] = record
        return record

    def heartbeat(self, worker_id: str) -> bool:
        record = self.workers.get(worker_id)
        if record is None:
            return False
        record.last_heartbeat = time.monotonic()
        if record.state == WorkerState.LOST:
            record.state = WorkerState.REGISTERED
        return True

    def mark_lost(self) -> list[WorkerRecord]:
        """Workers not heard from within the timeout become lost; returns the newly lost ones."""
        now = time.monotonic()
        lost = [r for r in self.workers.values()
                if r.state != WorkerState.LOST and r.state not in UNPLANNABLE
                and now - r.last_heartbeat > self.timeout_s]
        for record in lost:
            record.state = WorkerState.LOST
        return lost

    def remove(self, worker_id: str) -> WorkerRecord | None:
        return self.workers.pop(worker_id, None)

    def live(self) -> list[WorkerRecord]:
        """Live workers in registration order (the order stages are assigned in)."""
        return [r for r in self.workers.values() if r.state != WorkerState.LOST]
