"""Standby coordinators as processes (issue 29): etcd, two `coordinator serve --etcd` and three workers given
both addresses. 16 SDK streams (greedy and seeded) run; the leader is SIGKILLed mid-stream. The standby takes
over once the lease lapses, the workers register with it (their shards adopted: nothing fetched again), and
every stream resumes through the SDK and finishes with exactly the tokens of an undisturbed run. Prints the
time from the kill to each stream's next token."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.ha.election import Leader
from coordinator.ha.etcd import Etcd
from coordinator.ha.local_etcd import LocalEtcd
from shardline.client import Client
from tests.e2e.test_coordinator_restart import loads
from tests.e2e.test_coordinator_restart import run_streams as restart_streams
from tests.e2e.test_join_and_generate import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.slow]
STREAMS = 16
LEASE_S = 3  # the default


class Pair:
    """Two coordinators of one cluster on etcd, and workers given both addresses."""

    def __init__(self, store: Path, directory: Path, etcd: LocalEtcd, settings: str = "") -> None:
        self.etcd, self.directory = etcd, directory
        self.ports = [free_port(), free_port()]
        self.addresses = [f"127.0.0.1:{p}" for p in self.ports]
        self.endpoint = ",".join(self.addresses)
        self.out = open(directory / "coordinators.log", "ab")  # noqa: SIM115 - closed by close()
        self.coordinators: list[subprocess.Popen] = []
        for i, port in enumerate(self.ports):
            config = directory / f"c{i}.toml"
            config.write_text(f'store = "{store}"\nmodel = "tiny-llama"\nport = {port}\nworkers = 3\n'
                              f'jobs_dir = "{directory / f"jobs{i}"}"\nhttp = false\nresult_cache_mb = 0\n'
                              f'etcd = ["{etcd.url}"]\netcd_prefix = "/e2e"\n{settings}')
            self.coordinators.append(subprocess.Popen(
                [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)],
                stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True))
        self.workers = [subprocess.Popen(
            [sys.executable, "-m", "shard_worker.cli", "serve", "--port", str(free_port()), "--coordinator",
             self.endpoint, "--log-level", "WARNING"], stdout=self.out, stderr=subprocess.STDOUT)
            for _ in range(3)]

    def leader(self) -> Leader | None:
        async def ask() -> Leader | None:
            etcd = Etcd([self.etcd.endpoint])
            try:
                kv = await etcd.get("/e2e/leader")
                return Leader.decode(kv.value, kv.create_revision) if kv is not None else None
            finally:
                await etcd.close()

        return asyncio.run(ask())

    def kill(self, leader: Leader) -> None:
        i = self.addresses.index(leader.address)
        os.killpg(self.coordinators[i].pid, signal.SIGKILL)
        self.coordinators[i].wait(10)

    def close(self) -> None:
        for p in (*self.coordinators, *self.workers):
            p.kill()
        for p in (*self.coordinators, *self.workers):
            p.wait(10)
        self.out.close()
        print(f"--- the log, its end:\n{(self.directory / 'coordinators.log').read_text()[-6000:]}")


async def run_streams(endpoint: str, kill=None) -> tuple[list[list[int]], list[float]]:
    """The 16 streams' tokens and, with `kill`, each one's wait from the kill to its next token."""
    tokens, _, waits = await restart_streams(endpoint, kill, streams=STREAMS)
    return tokens, waits


def test_streams_survive_a_sigkill_of_the_leader_and_the_standby_adopts_the_workers(store, tmp_path):
    etcd = LocalEtcd.start(tmp_path / "etcd")
    pair = Pair(store.root, tmp_path, etcd)
    try:
        with Client(pair.endpoint, timeout=30) as client:
            client.wait_ready(timeout=180)
            workers = [w.address for w in client.cluster_status().workers]
        before = loads(workers)
        undisturbed, _ = asyncio.run(run_streams(pair.endpoint))
        first = pair.leader()
        assert first is not None
        tokens, waits = asyncio.run(run_streams(pair.endpoint, lambda: pair.kill(first)))
        assert tokens == undisturbed  # every stream: the undisturbed tokens, none repeated or missing
        second = pair.leader()
        assert second is not None and second.address != first.address
        assert second.epoch > first.epoch
        assert loads(workers) == before  # adopted by the new leader: no worker fetched its weights again
        print(f"\nkill -> next token per stream: {', '.join(f'{w:.2f}' for w in waits)} s")
        assert max(waits) <= 5.0 + 1.0, waits  # the default lease (3 s), election, registration, resume
    finally:
        pair.close()
        etcd.stop()


def test_a_leader_paused_past_its_lease_serves_nothing_when_it_wakes_and_stands_by(store, tmp_path):
    """SIGSTOP the leader for longer than its lease while 16 streams run: the standby takes over. SIGCONT the old
    one: it steps down by itself (its lease is known lost), stands by, sending callers to the new leader, and the
    streams finish with the undisturbed tokens."""
    import grpc

    from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

    etcd = LocalEtcd.start(tmp_path / "etcd")
    pair = Pair(store.root, tmp_path, etcd)
    try:
        with Client(pair.endpoint, timeout=30) as client:
            client.wait_ready(timeout=180)
        undisturbed, _ = asyncio.run(run_streams(pair.endpoint))
        first = pair.leader()
        assert first is not None
        paused = pair.coordinators[pair.addresses.index(first.address)]

        def pause_past_the_lease() -> None:
            os.killpg(paused.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while (now := pair.leader()) is None or now.address == first.address:
                assert time.monotonic() < deadline, "no standby took over"
                time.sleep(0.2)
            time.sleep(1.0)
            os.killpg(paused.pid, signal.SIGCONT)

        async def streams_with_a_pause() -> list[list[int]]:
            loop = asyncio.get_running_loop()
            tokens, _ = await run_streams(pair.endpoint, lambda: loop.run_in_executor(None, pause_past_the_lease))
            return tokens

        tokens = asyncio.run(streams_with_a_pause())
        assert tokens == undisturbed
        second = pair.leader()
        assert second is not None and second.address != first.address and second.epoch > first.epoch
        deadline = time.monotonic() + 20
        while "stepping down" not in (tmp_path / "coordinators.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, "the paused leader never stepped down"
            time.sleep(0.2)
        with grpc.insecure_channel(first.address) as ch:  # the woken one stands by: it sends callers on
            with pytest.raises(grpc.RpcError) as err:
                coordinator_pb2_grpc.CoordinatorStub(ch).ListModels(coordinator_pb2.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and second.address in err.value.details()
    finally:
        pair.close()
        etcd.stop()
