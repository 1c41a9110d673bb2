"""Standby coordinators on a real etcd, in one process: two coordinators of one cluster, one leads and the
other stands by (every call it gets is sent to the leader); workers given both addresses register with the
leader; when the leader steps down the standby takes over, the workers register with it (their shards
adopted, not reloaded), and a stream in flight resumes through the SDK with the tokens an undisturbed run
gives."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from contextlib import contextmanager

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.ha.serve import HighlyAvailable, start_ha
from shard_worker.registration import Registration
from shard_worker.server import start_worker
from shardline.client import Client
from shardline.errors import Unavailable
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

PROMPT = [5, 17, 99, 3, 42, 8, 7]
LEASE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ha_config(store, etcd, prefix: str, jobs) -> CoordinatorConfig:
    return CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=free_port(), http=False,
                             etcd=[etcd.url], etcd_prefix=prefix, etcd_lease_s=LEASE, jobs_dir=jobs,
                             heartbeat_timeout_ms=5000)


async def started(ha: HighlyAvailable) -> asyncio.Task[None]:
    return asyncio.ensure_future(ha.run())


async def register(worker, coordinators: str) -> asyncio.Task[None]:
    lifecycle = worker.servicer.lifecycle
    registration = Registration(coordinators, worker.address, 2**30, forgotten=lifecycle.end_all_sessions,
                                held=lifecycle.held, fence=worker.servicer.fence)
    return asyncio.ensure_future(registration.run())


@contextmanager
def pair(loop, store, etcd, prefix: str, tmp_path, n_workers: int):
    """Coordinators a (leading) and b (standing by) on `etcd`, and `n_workers` workers given both addresses
    ("A,B", yielded with a and b); everything stopped at the end."""
    a = loop.run(start_ha(ha_config(store, etcd, prefix, tmp_path / "a")))
    running = [loop.run(started(a))]
    workers, registrations = [], []
    b = None
    try:
        loop.run(asyncio.wait_for(a.became_leader.wait(), 10))
        b = loop.run(start_ha(ha_config(store, etcd, prefix, tmp_path / "b")))
        running.append(loop.run(started(b)))
        both = f"{a.election.me.address},{b.election.me.address}"
        workers = [loop.run(start_worker()) for _ in range(n_workers)]
        registrations = [loop.run(register(w, both)) for w in workers]
        yield a, b, both
    finally:
        for task in registrations:
            task.cancel()
        for ha in (b, a):
            if ha is not None:
                loop.run(ha.stop())
        for task in running:
            task.cancel()
        for w in workers:
            loop.run(w.stop(0))


def test_the_standby_sends_callers_to_the_leader_and_serves_once_it_steps_down(loop, store, etcd, tmp_path):
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    with pair(loop, store, etcd, prefix, tmp_path, 3) as (a, b, both):
        # the standby answers every call UNAVAILABLE naming the leader, in its message and trailing metadata
        with grpc.insecure_channel(b.election.me.address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                coordinator_pb2_grpc.CoordinatorStub(ch).ListModels(coordinator_pb2.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert a.election.me.address in err.value.details() and "standby" in err.value.details()
            assert ("shardline-leader", a.election.me.address) in tuple(err.value.trailing_metadata())
        # a gateway's per-caller view of a client that a standby redirects: the client itself goes along
        with Client(f"{b.election.me.address},{a.election.me.address}", timeout=60) as shared:
            view = shared.with_api_key(None, (("x-request-id", "r1"),))
            assert [m.name for m in view.list_models()] == ["tiny-llama"]
            assert shared._target == view._target == a.election.me.address and shared.channel is view.channel
        # the SDK given the standby first goes to the leader
        with Client(f"{b.election.me.address},{a.election.me.address}", timeout=60) as client:
            client.wait_ready(timeout=60)
            client.load_model("tiny-gpt2", workers=1)  # a run-time change: committed to etcd, not to A's disk
            reference = client.generate(PROMPT, max_tokens=1500, temperature=0, ignore_eos=True)
            status_before = {w.address: (w.start_layer, w.end_layer) for w in client.cluster_status().workers}
            chunks = client.generate(PROMPT, max_tokens=1500, temperature=0, ignore_eos=True, stream=True)
            tokens = [t for t in next(chunks).token_ids]
            stepped_down = time.monotonic()
            loop.run(a.stop())  # the leader resigns: the standby leads at once, not a lease later
            for chunk in chunks:
                tokens.extend(chunk.token_ids)
            took = time.monotonic() - stepped_down
            assert tokens == reference.token_ids, "the resumed stream differs from an undisturbed run"
            assert b.leaderships == 1 and b.election.epoch > 0
            after = client.cluster_status()
            # the same workers serve the same layers: adopted, not reloaded
            assert {w.address: (w.start_layer, w.end_layer) for w in after.workers} == status_before
            assert took < 15, took
            # the new leader serves the run-time change too: it read the fleet state from etcd
            assert {(m.name, m.ready) for m in client.list_models()} == {("tiny-llama", True), ("tiny-gpt2", True)}


def test_an_etcd_that_does_not_answer_stops_the_start_naming_it(loop, store, tmp_path):
    from coordinator.ha.etcd import EtcdUnavailable

    config = CoordinatorConfig(store=store.root, model="tiny-llama", port=free_port(), http=False,
                               etcd=[f"http://127.0.0.1:{free_port()}"], jobs_dir=tmp_path)
    with pytest.raises(EtcdUnavailable, match=r"etcd at 127\.0\.0\.1:\d+: UNAVAILABLE"):
        loop.run(start_ha(config))
    # the port it would have served on is free again
    with socket.socket() as s:
        s.bind(("127.0.0.1", config.port))
    with pytest.raises(Unavailable):
        with Client(f"127.0.0.1:{config.port}", timeout=2) as client:
            client.list_models()


def test_a_standby_whose_settings_differ_from_the_leaders_refuses_to_start_naming_them(loop, store, etcd, tmp_path):
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    a = loop.run(start_ha(ha_config(store, etcd, prefix, tmp_path / "a")))
    running = loop.run(started(a))
    try:
        loop.run(asyncio.wait_for(a.became_leader.wait(), 10))
        other = ha_config(store, etcd, prefix, tmp_path / "b").model_copy(update={"workers": 3,
                                                                                 "max_tokens_limit": 99})
        with pytest.raises(ValueError) as err:
            loop.run(start_ha(other))
        message = str(err.value)
        assert "differ from those of the leader at " + a.election.me.address in message
        assert "workers (3 here, 2 on the leader)" in message and "max_tokens_limit (99 here" in message
        assert "port" not in message.split(": ", 1)[1].split(". ")[0]  # its own port is its own
        same = loop.run(start_ha(ha_config(store, etcd, prefix, tmp_path / "c")))  # another port, same settings
        loop.run(same.stop())
    finally:
        loop.run(a.stop())
        running.cancel()


@pytest.mark.chaos  # kills etcd: in the default suite once it passed 20 runs in a row
@pytest.mark.slow
def test_etcd_lost_and_back_the_stream_resumes_and_fleet_changes_are_refused_meanwhile(loop, store, tmp_path):
    """etcd (its only member) killed while a stream runs: a fleet change is refused at once with UNAVAILABLE
    naming etcd; the leader steps down once it cannot know its lease alive; with etcd back a leader is elected,
    the workers register with it (their shards adopted, not loaded again) and the stream finishes with the
    tokens of an undisturbed run."""
    from coordinator.ha.local_etcd import LocalEtcd
    from tests.e2e.test_coordinator_restart import loads

    own = LocalEtcd.start(tmp_path / "etcd")
    prefix = "/lost"
    try:
        with pair(loop, store, own, prefix, tmp_path, 2) as (a, b, both):
            with Client(both, timeout=120) as client:
                client.wait_ready(timeout=60)
                addresses = [w.address for w in client.cluster_status().workers]
                before = loads(addresses)
                reference = client.generate(PROMPT, max_tokens=1500, temperature=0, ignore_eos=True)
                chunks = client.generate(PROMPT, max_tokens=1500, temperature=0, ignore_eos=True, stream=True)
                tokens = list(next(chunks).token_ids)
                own.kill()
                with pytest.raises(Unavailable, match=r"etcd at 127\.0\.0\.1:\d+"):
                    client.promote_model("tiny-llama@1")  # a fleet change: committed to etcd, or refused
                loop.run(asyncio.wait_for(a.election.lost.wait(), LEASE + 2))  # stepped down within its lease
                time.sleep(1.0)
                own.restart()
                for chunk in chunks:
                    tokens.extend(chunk.token_ids)
                assert tokens == reference.token_ids
                assert loads(addresses) == before  # adopted by whichever leads now: nothing loaded again
                assert a.leaderships + b.leaderships == 2  # a, then one of them again once etcd was back
    finally:
        own.stop()
