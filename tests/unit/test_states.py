"""The fleet's state machines (coordinator/fleet/states.py): every state has its row, the tables allow what
the fleet does and refuse what it must never do, and a worker record moves only along its table."""

from __future__ import annotations

import logging
import time

import pytest

from coordinator.fleet.registry import Registry
from coordinator.fleet.states import (
    ILLEGAL,
    REPLICA_TRANSITIONS,
    SERVES,
    UNPLANNABLE,
    WORKER_TRANSITIONS,
    ReplicaState,
    WorkerState,
    allowed,
)


@pytest.mark.parametrize("table, states", [(WORKER_TRANSITIONS, WorkerState), (REPLICA_TRANSITIONS, ReplicaState)])
def test_every_state_has_a_row_and_every_move_leads_to_a_state(table, states):
    assert set(table) == set(states)
    for old, targets in table.items():
        assert targets <= set(states), old
        assert allowed(table, old, old)  # a new message in the same state


def walk(table, start):
    """Every state reachable from `start`."""
    seen, todo = {start}, [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_worker_state_is_reachable_from_registration_and_drained_is_the_end():
    assert walk(WORKER_TRANSITIONS, WorkerState.REGISTERED) == set(WorkerState)
    assert walk(WORKER_TRANSITIONS, WorkerState.DRAINED) == {WorkerState.DRAINED, WorkerState.LOST,
                                                             WorkerState.REGISTERED, *walk(WORKER_TRANSITIONS,
                                                                                           WorkerState.REGISTERED)}
    assert WORKER_TRANSITIONS[WorkerState.DRAINED] == {WorkerState.LOST}


@pytest.mark.parametrize("old, new", [
    (WorkerState.LOST, WorkerState.SPARE),         # a silent worker never goes back to the pool unheard
    (WorkerState.LOST, WorkerState.FAILED),        # nor is its loss overwritten by a load that failed
    (WorkerState.LOST, WorkerState.LOADING),       # nor loaded, installed or drained by a change that began
    (WorkerState.LOST, WorkerState.READY),         # before it went silent
    (WorkerState.LOST, WorkerState.DRAINING),
    (WorkerState.DRAINED, WorkerState.SPARE),      # a drained worker leaves; it never rejoins the pool as is
    (WorkerState.DRAINED, WorkerState.READY),
    (WorkerState.FAILED, WorkerState.READY),       # a failed load is never taken for a loaded stage
])
def test_worker_moves_the_fleet_must_never_make(old, new):
    assert not allowed(WORKER_TRANSITIONS, old, new)


def test_every_replica_state_is_reachable_and_retired_is_final():
    assert walk(REPLICA_TRANSITIONS, ReplicaState.WAITING) == set(ReplicaState)
    assert REPLICA_TRANSITIONS[ReplicaState.RETIRED] == frozenset()
    assert not allowed(REPLICA_TRANSITIONS, ReplicaState.WAITING, ReplicaState.READY)  # ready only once placed
    assert SERVES == {ReplicaState.READY, ReplicaState.RECOVERING}
    assert UNPLANNABLE == {WorkerState.DRAINING, WorkerState.DRAINED}


def test_states_are_the_strings_status_and_metrics_always_showed():
    assert WorkerState.SPARE == "spare" and ReplicaState.WAITING == "waiting for workers"
    assert f"{WorkerState.LOST}" == "lost"


def test_a_worker_record_moves_along_its_table_and_an_illegal_move_is_logged_not_raised(caplog):
    registry = Registry(timeout_s=0.0)
    record = registry.register("127.0.0.1:1", 2**30)
    assert record.state is WorkerState.REGISTERED
    record.state = WorkerState.SPARE
    record.last_heartbeat = time.monotonic() - 1
    assert registry.mark_lost() == [record] and record.state is WorkerState.LOST
    assert registry.heartbeat(record.worker_id) and record.state is WorkerState.REGISTERED
    record.state = "loading"  # a string is taken as the state it names
    assert record.state is WorkerState.LOADING
    assert ILLEGAL not in caplog.text
    record.state = WorkerState.DRAINED
    with caplog.at_level(logging.ERROR, logger="coordinator.fleet.states"):
        record.state = WorkerState.SPARE  # a drained worker back in the pool: a bug, logged, not raised
    assert f"{ILLEGAL}: worker {record.worker_id} (127.0.0.1:1) drained -> spare" in caplog.text
    assert record.state is WorkerState.SPARE
    from tests.conftest import _ILLEGAL

    assert len(_ILLEGAL.unchecked()) == 1  # this test's illegal move was on purpose (and was seen)
