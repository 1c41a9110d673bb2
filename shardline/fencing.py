"""Fencing the coordinator's control calls to a worker (issue 27.1).

A worker registers with one life of the coordinator (its epoch, new at every start) under an identity of its own
(new in every worker process). The coordinator's calls that change what a worker holds (LoadShard,
UnloadShard, SetPeers, EndSession, Calibrate) name both in their metadata, and the worker refuses, with
FAILED_PRECONDITION, a call from another epoch (a coordinator that was replaced and does not know it yet) or for
another identity (a worker that was restarted on the same address). A call without these headers (an older
coordinator, or a coordinator that dials a worker that never registered) is taken as before; so is a call
while the worker is between registrations (it has no epoch then), unless it names an epoch the worker left.
The data path (Forward) is not fenced: a replaced coordinator's steps use sessions of its own (uuids), and the
sessions a worker holds for it are ended when the worker registers again."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from shardline.errors import FailedPrecondition

EPOCH_HEADER = "shardline-coordinator-epoch"

WORKER_HEADER = "shardline-worker-identity"
MAX_HEADER_CHARS = 128  # both are 32 hex digits; a longer one is named cut short
MAX_RETIRED = 8


def control_metadata(base: tuple[tuple[str, str], ...], epoch: str,
                     worker_identity: str = "") -> tuple[tuple[str, str], ...]:
    """A control call's metadata: `base` (the cluster's credentials) with the coordinator's epoch and the
    identity of the worker it means (each only when known)."""
    extra = ((EPOCH_HEADER, epoch),) if epoch else ()
    return base + extra + (((WORKER_HEADER, worker_identity),) if worker_identity else ())


@dataclass
class Fence:
    """A worker's side: who it is, and the coordinator epoch it registered in ("" while it has none)."""

    identity: str = field(default_factory=lambda: uuid.uuid4().hex)  # this process, never reused
    epoch: str = ""
    retired: list[str] = field(default_factory=list)  # epochs it left (the last few): refused even in between

    def joined(self, epoch: str) -> None:
        """Registered with the coordinator of `epoch`: its calls are taken, every other epoch's refused."""
        self.epoch = epoch
        self.retired = [e for e in self.retired if e != epoch]

    def retire(self) -> None:
        """The coordinator of this epoch was replaced: its calls are refused from now on, before the worker has
        registered with the next one too."""
        if self.epoch:
            self.retired = [*self.retired[-(MAX_RETIRED - 1):], self.epoch]
        self.epoch = ""

    def check(self, metadata: Mapping[str, str]) -> None:
        """Raise FailedPrecondition for a control call of another epoch or meant for another worker."""
        epoch = metadata.get(EPOCH_HEADER, "")
        if epoch and ((self.epoch and epoch != self.epoch) or epoch in self.retired):
            raise FailedPrecondition(
                f"this worker is registered with coordinator epoch {self.epoch or '(none yet)'}; the call came from "
                f"epoch {epoch[:MAX_HEADER_CHARS]}, a coordinator that has been replaced: it is refused")
        meant = metadata.get(WORKER_HEADER, "")
        if meant and self.epoch and meant != self.identity:  # registered: the coordinator knows it by this
            raise FailedPrecondition(
                f"the call is meant for worker {meant[:MAX_HEADER_CHARS]}, but this address is now worker "
                f"{self.identity} (a new process): the coordinator learns of it when it registers")
