"""A coordinator that restarts serves what it served (issue 27.2): versions loaded, promoted, scaled and
unloaded at run time are committed before they are acknowledged, and replayed at the next start; a start with
another configuration begins from that configuration. Real coordinators on port 0, in-process workers."""

from __future__ import annotations

import sqlite3

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from coordinator.fleet.durable import SCHEMA, FleetStateError, configuration_digest
from shardline.client import Client
from shardline.errors import FailedPrecondition
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc


def served(coordinator) -> tuple[dict[str, int], dict[str, str]]:
    """What the coordinator deploys: each deployment's replicas (placed, or waiting for workers) and defaults."""
    fleet = coordinator.fleet
    return {k: len(d.live) for k, d in fleet.deployments.items()}, dict(fleet.defaults)


def test_a_restarted_coordinator_serves_the_versions_defaults_and_replicas_changed_at_run_time(
        loop, store, parameters, workers, tmp_path):
    def config(**more) -> CoordinatorConfig:
        fields = dict(store=store.root, workers=2, port=0, parameters_address=parameters.address,
                      heartbeat_timeout_ms=3_600_000, jobs_dir=tmp_path, http=False,
                      deployments=[dict(name="tiny-llama"), dict(name="tiny-gpt2")])
        return CoordinatorConfig(**(fields | more))

    first = loop.run(start_coordinator(config()))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(first.address))
    for w in workers(6):
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))
    try:
        with Client(first.address, timeout=120) as client:
            client.wait_ready(timeout=120)
            client.load_model("tiny-llama", version="2", source="tiny-llama")
            assert client.promote_model("tiny-llama@2") == "1"
            client.unload_model("tiny-gpt2@1", grace_s=0)
            assert "1 replicas added" in client.scale_model("tiny-llama@1", 2)
            with pytest.raises(FailedPrecondition):  # no free worker for it: refused, and not recorded
                client.scale_model("tiny-llama@2", 2)
        before = served(first)
        assert before == ({"tiny-llama@1": 2, "tiny-llama@2": 1}, {"tiny-llama": "2"})
    finally:
        loop.run(first.stop())  # as if it died: nothing more is written at stop

    again = loop.run(start_coordinator(config()))
    try:
        assert served(again) == before
        assert again.fleet.deployments["tiny-llama@2"].spec.model == "tiny-llama"  # its source, as loaded
    finally:
        loop.run(again.stop())

    other = loop.run(start_coordinator(config(workers=1)))  # another configuration: its own deployments only
    try:
        assert served(other) == ({"tiny-llama@1": 1, "tiny-gpt2@1": 1}, {"tiny-llama": "1", "tiny-gpt2": "1"})
    finally:
        loop.run(other.stop())

    damaged_config = config(deployments=[dict(name="damaged", source="tiny-llama")])
    digest = configuration_digest(damaged_config.initial_deployments())
    state = tmp_path / f"fleet-{digest}.sqlite"
    state.write_bytes(b"not a database" * 100)
    with pytest.raises(FleetStateError, match=f"the fleet state {state} is not a fleet state .*move it away"):
        loop.run(start_coordinator(damaged_config))  # nothing served half: it does not start
    state.unlink()
    with sqlite3.connect(state) as db:  # a newer release's layout
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(FleetStateError, match="written by a newer shardline .layout 7; this one reads 1"):
        loop.run(start_coordinator(damaged_config))
    state.unlink()
    with sqlite3.connect(state) as db:  # a record that does not parse
        db.executescript(SCHEMA)
        db.execute("INSERT INTO deployments VALUES ('x@1', '{\"name\": 5}')")
    with pytest.raises(FleetStateError, match="holds a record that does not parse .deployment 'x@1'"):
        loop.run(start_coordinator(damaged_config))

    forgetful = loop.run(start_coordinator(config(durable_fleet=False)))
    try:
        assert set(served(forgetful)[0]) == {"tiny-llama@1", "tiny-gpt2@1"}
    finally:
        loop.run(forgetful.stop())
