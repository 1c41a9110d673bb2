"""The fleet's states, as enums with their allowed transitions in one place per machine.

A worker record (fleet/registry.py) and a replica (fleet/replica.py) move only along these tables, which hold
every move the fleet makes today (a stream's table is coordinator/serving/streams.py's). The values are the
strings the status API, the metrics and the CLI have always shown (StrEnum: a state compares equal to its
string). A move a table does not allow is checked by coordinator/transitions.py: logged as an ERROR, never
raised.
"""

from __future__ import annotations

from enum import StrEnum

from coordinator.transitions import ILLEGAL, allowed, moved

__all__ = ["ILLEGAL", "allowed", "moved"]  # and every name defined below


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
    # heard from again; drained while silent. A worker marked lost while its replica changes is never loaded,
    # installed or drained (fleet/rechain.py, fleet.py drain_worker): it goes back through registered
    _W.LOST: frozenset({_W.REGISTERED, _W.DRAINED}),
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


class DeploymentState(StrEnum):
    """A deployment's state is derived from its replicas' (deployments.py Deployment.state), never set: it has
    no transitions of its own."""

    READY = "ready"
    RECOVERING = "recovering"
    DEPLOYING = "deploying"
    FAILED = "failed"
    WAITING = "waiting for workers"
    UNLOADING = "unloading"
    DRAINING = "draining"              # every live replica is draining away
    SCALED_TO_ZERO = "scaled to zero"  # no replica left, by a scale to 0


# a deployment is in the state of its best live replica, in this order (none of these: WAITING)
BEST_REPLICA_FIRST = ((_R.READY, DeploymentState.READY), (_R.RECOVERING, DeploymentState.RECOVERING),
                      (_R.DEPLOYING, DeploymentState.DEPLOYING), (_R.FAILED, DeploymentState.FAILED))
