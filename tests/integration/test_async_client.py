"""AsyncClient's admin and job calls against a real coordinator with real workers (tiny-llama, token ids in
and out): the values and errors of Client's calls, awaited. Client's own are tested in test_fleet and
test_jobs; both clients run the same table of calls (tests/unit/test_client_table.py)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shardline.client import AsyncClient, Client
from shardline.errors import FailedPrecondition, InvalidArgument, NotFound
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

PROMPTS = [[5, 17, 99, 3], [42, 8], [7, 7, 7, 120]]
GREEDY = dict(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture()
def coordinator(loop, store, parameters, workers, tmp_path):
    """tiny-llama on 2 stages, 3 more workers free; jobs in tmp_path."""
    config = CoordinatorConfig(store=store.root, workers=2, port=0, parameters_address=parameters.address,
                               heartbeat_timeout_ms=3_600_000, jobs_dir=tmp_path / "jobs",
                               deployments=[dict(name="tiny-llama")])
    coordinator = loop.run(start_coordinator(config))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in workers(5):
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))
    yield coordinator
    loop.run(coordinator.stop())


def test_the_async_admin_calls_change_the_fleet_and_say_what_is_wrong(coordinator):
    async def admin() -> None:
        async with AsyncClient(coordinator.address, timeout=120) as client:
            await client.wait_ready(timeout=120)
            with pytest.raises(NotFound, match="not in the store"):
                await client.load_model("ghost")
            with pytest.raises(InvalidArgument, match="names no version"):
                await client.promote_model("tiny-llama")
            with pytest.raises(NotFound, match="not served here"):
                await client.scale_model("nope", 1)
            with pytest.raises(FailedPrecondition, match="already loaded"):
                await client.load_model("tiny-llama")
            with pytest.raises(InvalidArgument, match="address is empty"):
                await client.drain_worker("")

            assert "tiny-llama@2" in await client.load_model("tiny-llama", version="2", source="tiny-llama")
            assert await client.promote_model("tiny-llama@2") == "1"
            models = [m for m in await client.list_models() if m.name == "tiny-llama"]
            assert sorted((m.version, m.is_default) for m in models) == [("1", False), ("2", True)]
            first = [(await client.generate(p, model="tiny-llama@1", **GREEDY)).token_ids for p in PROMPTS]

            (replica,) = coordinator.fleet.deployments["tiny-llama@2"].replicas
            leaving = replica.assignment[0].address
            assert "drained" in await client.drain_worker(leaving)
            assert leaving not in [w.address for w in replica.assignment]
            assert isinstance(await client.rebalance(), str)
            # version 2 is the same weights: the same tokens, whichever workers hold it now
            assert [(await client.generate(p, model="tiny-llama", **GREEDY)).token_ids for p in PROMPTS] == first

            message, freed = await client.unload_model("tiny-llama@1", grace_s=0)
            assert freed > 0, message
            assert "1 replicas added" in await client.scale_model("tiny-llama@2", 2)
            while (await client.list_models())[0].replicas_ready < 2:  # the pytest timeout bounds it
                await asyncio.sleep(0.05)
            (deployment,) = (await client.cluster_status()).deployments
            assert (deployment.name, deployment.version, len(deployment.replicas)) == ("tiny-llama", "2", 2)
            with Client(coordinator.address, timeout=30) as sync:  # the blocking client reads the same
                assert await asyncio.to_thread(sync.list_models) == await client.list_models()

    asyncio.run(admin())


def test_the_async_job_calls_run_a_job_as_the_blocking_ones_do(coordinator, tmp_path):
    lines = [{"custom_id": f"row {i}", "prompt_token_ids": p, "model": "tiny-llama", **GREEDY}
             for i, p in enumerate(PROMPTS)]
    job_file = tmp_path / "job.jsonl"
    job_file.write_text("\n".join(json.dumps(line) for line in lines))

    async def jobs() -> None:
        async with AsyncClient(coordinator.address, timeout=120) as client:
            await client.wait_ready(timeout=120)
            job_id = await client.submit_job(lines, label="async")
            from_file = await client.submit_job_file(str(job_file))
            status = await client.wait_job(job_id, timeout=60, poll_s=0.05)
            assert (status.state, status.done, status.total, status.label) == ("completed", 3, 3, "async")
            assert (await client.get_job(job_id)).state == "completed"
            results = await client.job_results(job_id)
            interactive = [(await client.generate(p, model="tiny-llama", **GREEDY)).token_ids for p in PROMPTS]
            assert [(r.custom_id, list(r.token_ids)) for r in results] == [
                (f"row {i}", ids) for i, ids in enumerate(interactive)]
            assert (await client.wait_job(from_file, timeout=60, poll_s=0.05)).label == str(job_file)
            assert sorted(j.job_id for j in await client.list_jobs()) == sorted([job_id, from_file])
            with pytest.raises(NotFound, match="no job 'job-0000'"):
                await client.cancel_job("job-0000")
            with pytest.raises(InvalidArgument, match="item 0: prompt is empty"):
                await client.submit_job([{"max_tokens": 3}], model="tiny-llama")
        with Client(coordinator.address, timeout=30) as sync:
            assert sync.job_results(job_id) == results  # the same values as the blocking client's

    asyncio.run(jobs())
