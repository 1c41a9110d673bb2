"""The fleet's run-time changes in a real etcd (coordinator/ha/fleet_state.py): written only while the writer's
leadership lasts (a deposed leader's late change is refused), read back in the order they were made, and read
past an etcd member that does not answer."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.config import DeploymentSpec
from coordinator.ha.election import Election, Leader
from coordinator.ha.etcd import Etcd
from coordinator.ha.fleet_state import EtcdFleetState
from shardline.errors import Unavailable


def test_changes_commit_only_while_the_leadership_lasts_and_read_past_a_dead_member(loop, etcd):
    election = Election(Etcd([etcd.endpoint]), "/fs/leader", Leader("a:1", "a:2", 0), 2)
    epoch = loop.run(asyncio.wait_for(election.campaign(), 5))
    configured = [DeploymentSpec(name="tiny-llama")]
    state = EtcdFleetState([etcd.endpoint], "/fs", configured, election.key, epoch)
    try:
        state.deployed(DeploymentSpec(name="tiny-gpt2", replicas=2))
        state.promoted("tiny-gpt2", "1")
        state.unloaded("tiny-llama@1")
        # a member that does not answer first: read from the next
        fresh = EtcdFleetState(["127.0.0.1:1", etcd.endpoint], "/fs", configured, election.key, epoch)
        changes = fresh.load()
        fresh.close()
        assert list(changes.deployments) == ["tiny-gpt2@1", "tiny-llama@1"]
        assert changes.deployments["tiny-gpt2@1"].replicas == 2 and changes.deployments["tiny-llama@1"] is None
        assert changes.defaults == {"tiny-gpt2": "1"}
        loop.run(election.resign())  # deposed: its late change must not land
        with pytest.raises(Unavailable, match="no longer leads"):
            state.deployed(DeploymentSpec(name="tiny-gpt2", replicas=5))
        again = EtcdFleetState([etcd.endpoint], "/fs", configured).load()
        assert again.deployments["tiny-gpt2@1"].replicas == 2
    finally:
        state.close()
        loop.run(election.etcd.close())


def test_an_etcd_that_cannot_be_reached_refuses_the_change_naming_it(etcd):
    state = EtcdFleetState(["127.0.0.1:1"], "/fs2", [])
    try:
        with pytest.raises(Unavailable, match=r"etcd at 127\.0\.0\.1:1: (UNAVAILABLE|DEADLINE_EXCEEDED)"):
            state.promoted("m", "2")
    finally:
        state.close()
