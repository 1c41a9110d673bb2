"""The fleet's states, as enums with their allowed transitions in one place per machine.

A worker record (fleet/registry.py) and a replica (fleet/replica.py) move only along these tables, which hold
every move the fleet makes today. The values
are the strings the status API, the metrics and the CLI have always shown (StrEnum: a state compares equal to
its string). A move the table does not allow is a bug of the coordinator's: it is logged as an ERROR naming
both states (the suite fails on such a line, tests/conftest.py) and the state is set anyway, so that a
missed case in a table never stops a cluster that would otherwise serve.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

log = logging.getLogger(__name__)

ILLEGAL = "illegal state transition"  # the log line's words, which the test suite watches for


class WorkerState(StrEnum):
    REGISTERED = "registered"  # joined, not placed yet
    SPARE = "spare"            # in the pool, waiting to be needed
    LOADING = "loading"        # a LoadShard is in flight
    READY = "ready"            # serves its stage
    FAILED = "failed"          # its last load failed
    LOST = "lost"              # no heartbeat within the timeout (or did not answer a probe)
    DRAINING = "draining"      # handing its stage over before it leaves
    DRAINED = "drained"        # handed over; it leaves the cluster


_W = WorkerState
_PLACEABLE_FROM = {_W.REGISTERED, _W.SPARE, _W.LOADING, _W.READY, _W.FAILED}
WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    # a registered or spare worker that already holds the stage wanted (a rebalance kept its shard) is adopted
    # as ready without a load (fleet/membership.py choose_replacements)
    _W.REGISTERED: frozenset({_W.SPARE, _W.LOADING, _W.READY, _W.LOST, _W.DRAINING, _W.DRAINED}),
    _W.SPARE: frozenset({_W.LOADING, _W.READY, _W.LOST, _W.DRAINING, _W.DRAINED}),
    _W.LOADING: frozenset({_W.READY, _W.FAILED, _W.SPARE, _W.LOST, _W.DRAINING, _W.DRAINED}),
    _W.READY: frozenset({_W.LOADING, _W.FAILED, _W.SPARE, _W.LOST, _W.DRAINING, _W.DRAINED}),
    _W.FAILED: frozenset({_W.LOADING, _W.SPARE, _W.LOST, _W.DRAINING, _W.DRAINED}),
    # heard from again; drained while silent. LOADING, READY and DRAINING are races the replica does not close
    # yet (a worker marked lost while its replica loads, installs or drains it): allowed, so that they are
    # not errors, and listed in the issue notes to close
    _W.LOST: frozenset({_W.REGISTERED, _W.DRAINED, _W.LOADING, _W.READY, _W.DRAINING}),
    _W.DRAINING: frozenset({*_PLACEABLE_FROM, _W.DRAINED, _W.LOST}),  # a failed drain restores what it was
    _W.DRAINED: frozenset({_W.LOST}),  # its process went away
}
UNPLANNABLE = frozenset({_W.DRAINING, _W.DRAINED})  # states a worker is never planned into


class ReplicaState(StrEnum):
    WAITING = "waiting for workers"
    DEPLOYING = "deploying"
    RECOVERING = "recovering"  # its chain is being healed or changed: requests wait at its gate
    READY = "ready"
    FAILED = "failed"
    RETIRED = "retired"        # unloaded: holds no worker, serves nothing


_R = ReplicaState
_ACTIVE = {_R.WAITING, _R.DEPLOYING, _R.RECOVERING, _R.READY, _R.FAILED}
REPLICA_TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    _R.WAITING: frozenset({_R.DEPLOYING, _R.RECOVERING, _R.FAILED, _R.RETIRED}),
    _R.DEPLOYING: frozenset(_ACTIVE | {_R.RETIRED}),
    _R.RECOVERING: frozenset(_ACTIVE | {_R.RETIRED}),
    _R.READY: frozenset({_R.RECOVERING, _R.DEPLOYING, _R.FAILED, _R.WAITING, _R.RETIRED}),
    # a failed replica that kept its assignment is installed again by a drain or a rebalance without passing
    # through recovering
    _R.FAILED: frozenset({_R.WAITING, _R.DEPLOYING, _R.RECOVERING, _R.READY, _R.RETIRED}),
    _R.RETIRED: frozenset(),
}
SERVES = frozenset({_R.READY, _R.RECOVERING})  # replica states that take requests (recovering: at its gate)


S = TypeVar("S", bound=StrEnum)


def allowed(table: Mapping[S, frozenset[S]], old: S, new: S) -> bool:
    """Staying in a state is always allowed (a new message, the same state)."""
    return old == new or new in table[old]


def moved(what: str, table: Mapping[S, frozenset[S]], old: S, new: S) -> None:
    """Check one move; an illegal one is logged (see the module's docstring), never raised."""
    if not allowed(table, old, new):
        log.error("%s: %s %s -> %s (not in coordinator/fleet/states.py)", ILLEGAL, what, old, new)
