"""Streams that resume (issue 27.4): a Generate sent again with the token ids already received goes on with
exactly the tokens (and text) an undisturbed run gives, and the SDK does that on its own when its connection
breaks mid-stream. Real coordinator and workers on port 0; the break is a real TCP reset (tests/faults.py)
between the SDK and the coordinator."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from shardline.client import AsyncClient, Client
from shardline.errors import Unavailable
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.faults import FaultProxy

PROMPT = [5, 17, 99, 3]
KINDS = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.9, seed=1234),
         "unseeded": dict(temperature=0.9)}


@pytest.fixture(scope="module")
def cluster(tokenless_cluster):
    """tiny-llama over two workers: the coordinator and its Coordinator stub."""
    yield tokenless_cluster, coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(tokenless_cluster.address))


def generate(stub, **fields) -> list[coordinator_pb2.GenerateResponse]:
    return list(stub.Generate(coordinator_pb2.GenerateRequest(**fields), timeout=60))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_resumed_request_goes_on_with_the_undisturbed_tokens(cluster, kind):
    _, stub = cluster
    request = dict(prompt_token_ids=PROMPT, max_tokens=20, ignore_eos=True, **KINDS[kind])
    whole = generate(stub, **request)
    first = whole[0]
    tokens = [t for m in whole for t in m.token_ids]
    assert len(tokens) == 20 and first.model == "tiny-llama@1"
    assert first.HasField("seed") == (kind != "greedy") and (kind != "seeded" or first.seed == 1234)
    for k in (1, 7, 19):
        resumed = generate(stub, **{**request, "model": first.model, "seed": first.seed},
                           resume_token_ids=tokens[:k]) if kind != "greedy" else \
            generate(stub, **request, model=first.model, resume_token_ids=tokens[:k])
        assert [t for m in resumed for t in m.token_ids] == tokens[k:], (kind, k)
        assert resumed[-1].usage.completion_tokens == 20 and resumed[-1].usage.prompt_tokens == len(PROMPT)
        assert resumed[-1].finish_reason == coordinator_pb2.FINISH_REASON_LENGTH
        assert not any(m.cached for m in resumed)  # a tail is never the cache's answer, nor put in it


@pytest.mark.parametrize("fields, names", [
    (dict(max_tokens=4, resume_token_ids=[1, 2, 3, 4]), "resume_token_ids holds 4 tokens, as many as max_tokens"),
    (dict(max_tokens=4, resume_token_ids=[1, 2**40]), "resume_token_ids[1] is 1099511627776, outside"),
    (dict(max_tokens=4, resume_token_ids=[1, -1]), "resume_token_ids[1] is -1, outside"),
    (dict(max_tokens=4, resume_token_ids=[1] * 5000), "resume_token_ids holds 5000 tokens; a stream produces at most"),
    (dict(max_tokens=4, resume_token_ids=[1], model="tiny-llama@9"), "model 'tiny-llama@9' is not served here"),
])
def test_a_resume_that_cannot_be_one_is_refused_naming_the_field(cluster, fields, names):
    _, stub = cluster
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, prompt_token_ids=PROMPT, temperature=0.0, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and names in err.value.details()
    assert len(generate(stub, prompt_token_ids=PROMPT, max_tokens=3, temperature=0.0)) == 3  # nothing disturbed
    with pytest.raises(grpc.RpcError) as err:  # without resume_token_ids, an unknown version is as before
        generate(stub, prompt_token_ids=PROMPT, max_tokens=3, model="tiny-llama@9")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.chaos
def test_the_sdk_resumes_a_stream_whose_connection_broke(loop, cluster):
    """Client and AsyncClient, streaming and not, greedy and seeded: the connection is reset mid-stream (a
    TCP RST, as when a coordinator dies); the SDK sends the request again with what it received, and the
    caller sees the undisturbed tokens, once each, and no error."""
    coordinator, _ = cluster
    proxy = loop.run(FaultProxy.start(coordinator.address))
    params = dict(max_tokens=120, ignore_eos=True)
    try:
        with Client(coordinator.address, timeout=60) as direct:
            undisturbed = {kind: direct.generate(PROMPT, **params, **KINDS[kind]).token_ids
                           for kind in ("greedy", "seeded")}
        with Client(proxy.address, timeout=60) as client:
            for kind, expected in undisturbed.items():
                seen: list[int] = []
                connections = proxy.connections
                for chunk in client.generate(PROMPT, stream=True, **params, **KINDS[kind]):
                    seen += chunk.token_ids
                    if len(seen) == 10:
                        asyncio.run_coroutine_threadsafe(_reset_soon(proxy, 0), loop.loop).result()
                assert seen == expected, kind
                assert proxy.connections > connections  # it broke, and went on over a new connection
        with Client(proxy.address, timeout=60) as client:  # not streaming: the result, whole
            breaker = asyncio.run_coroutine_threadsafe(_reset_soon(proxy, 0.05), loop.loop)
            result = client.generate(PROMPT, max_tokens=400, ignore_eos=True, temperature=0.0)
            breaker.result()
            with Client(coordinator.address, timeout=60) as direct:
                assert result.token_ids == direct.generate(PROMPT, max_tokens=400, ignore_eos=True,
                                                           temperature=0.0).token_ids
            assert result.completion_tokens == 400 and result.resumed >= 1

        async def streamed(kind: str) -> list[int]:
            async with AsyncClient(proxy.address, timeout=60) as client:
                seen: list[int] = []
                connections = proxy.connections
                stream = await client.generate(PROMPT, stream=True, **params, **KINDS[kind])
                async for chunk in stream:
                    seen += chunk.token_ids
                    if len(seen) == 10:
                        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_reset_soon(proxy, 0), loop.loop))
                assert proxy.connections > connections  # it broke, and went on over a new connection
                return seen

        for kind, expected in undisturbed.items():
            assert asyncio.run(streamed(kind)) == expected, kind
    finally:
        loop.run(proxy.close())


def test_the_coordinators_own_unavailable_mid_stream_is_raised_at_once(loop, store, parameters, pool, tmp_path):
    """A deployment unloaded under a stream: the coordinator answers UNAVAILABLE saying so; the SDK raises it
    at once (it is the coordinator's answer, not a broken connection)."""
    import threading
    import time

    from coordinator.api.server import start_coordinator
    from coordinator.config import CoordinatorConfig

    # its own jobs_dir: the unload is committed to the fleet state there, not in the store the others share
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=1, port=0, http=False, jobs_dir=tmp_path,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000)
    coordinator = loop.run(start_coordinator(config))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=pool(1)[0].address,
                                                                  memory_budget_bytes=2**30))
    try:
        with Client(coordinator.address, timeout=60) as client, Client(coordinator.address, timeout=60) as admin:
            client.wait_ready(timeout=60)
            unloading = None
            with pytest.raises(Unavailable, match="was unloaded before this request finished"):
                for chunk in client.generate(PROMPT, stream=True, max_tokens=2000, ignore_eos=True, temperature=0):
                    if chunk.token_ids and unloading is None:
                        began = time.monotonic()
                        unloading = threading.Thread(target=admin.unload_model, args=("tiny-llama@1",),
                                                     kwargs={"grace_s": 0})
                        unloading.start()
            assert time.monotonic() - began < 20  # raised at once: not waited through to the deadline
            unloading.join(30)
    finally:
        loop.run(coordinator.stop())


def test_a_client_that_never_reached_the_coordinator_fails_at_once():
    with Client("127.0.0.1:1", timeout=30) as client, pytest.raises(Unavailable) as err:
        client.generate(PROMPT, max_tokens=2)
    assert "resume" not in err.value.message  # the usual error, not a resume that waited out its deadline


async def _reset_soon(proxy: FaultProxy, delay: float) -> None:
    await asyncio.sleep(delay)
    proxy.reset()


def test_a_stream_that_gets_no_token_within_token_wait_s_fails_saying_so_and_the_cluster_goes_on(loop, cluster):
    """Every wait on the request path has a deadline (issue 27.5): a chain whose gate stays closed (a heal
    that never ends) fails the stream after token_wait_s with UNAVAILABLE, however long the caller's own
    deadline; once the gate opens, the cluster serves as before."""
    import time

    coordinator, stub = cluster
    fleet = coordinator.fleet
    pipeline = fleet.first.pipeline
    before = fleet.config.token_wait_s
    fleet.config.token_wait_s = 1.0
    loop.loop.call_soon_threadsafe(pipeline.suspend)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, prompt_token_ids=[7, 7, 7, 1], max_tokens=4, ignore_eos=True)
        waited = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no token came for 1 s" in err.value.details()
        assert "token_wait_s" in err.value.details() and 1.0 <= waited < 10, waited
    finally:
        fleet.config.token_wait_s = before
        loop.loop.call_soon_threadsafe(pipeline.resume)
    tokens = [t for m in generate(stub, prompt_token_ids=[7, 7, 7, 1], max_tokens=4, ignore_eos=True)
              for t in m.token_ids]
    assert len(tokens) == 4
    deadline = time.monotonic() + 5  # the failed stream leaves its group at the group's next cycle
    while [s for g in fleet.first.scheduler.policy.groups for s in g] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [s for g in fleet.first.scheduler.policy.groups for s in g]
