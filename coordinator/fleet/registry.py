"""Registered shard workers: where they are, what they offer, when they were last heard from."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from coordinator.fleet.planner import StagePlan
from coordinator.fleet.states import UNPLANNABLE, WORKER_TRANSITIONS, WorkerState, moved


@dataclass(frozen=True)
class LoadedShard:
    """What a worker reports it holds (model "" when it holds nothing); `digest` is of the model's weights
    (shardline/weights_digest.py): a shard is the one wanted only when its weights are the store's now."""

    model: str
    start: int
    end: int
    digest: str = ""
    # how it was loaded (compute dtype, weight quantization, KV block tokens): a shard loaded otherwise than
    # the coordinator now asks (its configuration changed across a restart) is `stale`: never adopted as it is
    form: tuple[str, int, int] = field(default=("", 0, 0), compare=False)
    stale: bool = False


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
    identity: str = ""  # the worker process's own identity ("" = an older worker, known by its id alone)
    held: LoadedShard | None = None  # the shard it held when it registered (adopted after a restart)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            value = WorkerState(value)  # a name that is no state is a programming error: ValueError
            if "state" in self.__dict__:  # a move, not the first assignment
                moved(f"worker {self.worker_id} ({self.address})", WORKER_TRANSITIONS, self.__dict__["state"], value)
        super().__setattr__(name, value)


__all__ = ["UNPLANNABLE", "LoadedShard", "Registry", "WorkerDevice", "WorkerRecord"]


class Registry:
    """Worker ids are unique within one life of the coordinator (`epoch`, new at every start); a worker names
    its id, its own identity and the epoch it registered in, and is known only if all three match: after a
    restart, a worker of the old life is told to register again, never taken for the one that got its old id."""

    def __init__(self, timeout_s: float, epoch: str = "") -> None:
        self.timeout_s = timeout_s
        self.workers: dict[str, WorkerRecord] = {}
        self._ids = itertools.count(1)
        self.epoch = epoch or uuid.uuid4().hex  # a leadership's, from etcd (issue 29); else new at every start

    def register(self, address: str, memory_budget_bytes: int, device: WorkerDevice | None = None,
                 identity: str = "", held: LoadedShard | None = None) -> WorkerRecord:
        """A worker that registers again at the same address (or with the same identity) replaces its old
        record; the same worker process at the same address (its reply was lost) keeps its record."""
        same = self.same_worker(address, identity)
        if same is not None:
            same.last_heartbeat = time.monotonic()
            return same
        for worker_id, record in list(self.workers.items()):
            if record.address == address or (identity and record.identity == identity):
                del self.workers[worker_id]
        record = WorkerRecord(f"w{next(self._ids)}", address, memory_budget_bytes, time.monotonic(),
                              device=device or WorkerDevice(), identity=identity, held=held)
        self.workers[record.worker_id] = record
        return record

    def same_worker(self, address: str, identity: str) -> WorkerRecord | None:
        """This worker process's live record at this address, if it has one (registering again)."""
        return next((r for r in self.workers.values() if identity and r.identity == identity
                     and r.address == address and r.state != WorkerState.LOST), None)

    def known(self, worker_id: str, identity: str = "", epoch: str = "") -> WorkerRecord | None:
        """The record of a worker that names itself so; None if it is not this one's, or of another epoch
        (an older worker names no identity and no epoch: its id alone)."""
        record = self.workers.get(worker_id)
        if record is None or record.identity != identity or (epoch and epoch != self.epoch):
            return None
        if identity and not epoch:  # a worker with an identity always names its epoch
            return None
        return record

    def heartbeat(self, worker_id: str, identity: str = "", epoch: str = "") -> bool:
        record = self.known(worker_id, identity, epoch)
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
