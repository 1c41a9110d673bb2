"""The stage-stream primitive against misbehaving peers (real grpc.aio servers on port 0 that speak the
Forward method's wire format but misbehave): a step past its deadline, garbage, or a stream closed early
gives DEADLINE_EXCEEDED or UNAVAILABLE naming the peer, never a hang; the window bounds steps in flight;
a broken stream is replaced by a new connection on the next step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from shardline.errors import DeadlineExceeded, Unavailable
from shardline.server import bind, new_server
from shardline.stream import FORWARD, LinkSettings, StageStream
from shardline.v1 import worker_pb2

Behaviour = Callable[[worker_pb2.ForwardRequest], Any]


async def serve(behaviour: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]],
                port: int = 0) -> tuple[grpc.aio.Server, str]:
    """A server whose Forward is `behaviour` over raw request bytes."""
    server = new_server()
    service, method = FORWARD.strip("/").split("/")

    async def handler(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for out in behaviour(requests):
            yield out

    rpc = grpc.stream_stream_rpc_method_handler(handler)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: rpc})])
    bound = bind(server, "127.0.0.1", port)
    await server.start()
    return server, f"127.0.0.1:{bound}"


async def echo(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for raw in requests:
        request = worker_pb2.ForwardRequest.FromString(raw)
        yield worker_pb2.ForwardResponse(step_id=request.step_id, token_ids=[7]).SerializeToString()


async def silent(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for _ in requests:
        pass
    if False:  # pragma: no cover - an async generator that never yields
        yield b""


async def garbage(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield b"\xff\xff\xff\xff not a ForwardResponse"


async def closes_early(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for _ in requests:
        return
    yield b""  # pragma: no cover


def request() -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(sequences=[worker_pb2.SequenceSlice(session_id="s", num_tokens=1)],
                                     token_ids=[1])


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))  # a hang fails the test instead of the suite


def test_a_step_past_its_deadline_fails_naming_the_peer_and_the_link_is_reset():
    async def go():
        server, address = await serve(silent)
        stream = StageStream(address, LinkSettings(step_timeout_ms=300))
        try:
            with pytest.raises(DeadlineExceeded, match=address):
                await stream.step(request())
            assert stream.in_flight == 0
        finally:
            await stream.close()
            await server.stop(0)

    run(go())


@pytest.mark.parametrize("behaviour", [garbage, closes_early])
def test_garbage_or_a_stream_closed_early_fails_every_pending_step_with_unavailable(behaviour):
    async def go():
        server, address = await serve(behaviour)
        stream = StageStream(address, LinkSettings(step_timeout_ms=10_000))
        try:
            results = await asyncio.gather(*(stream.step(request()) for _ in range(4)), return_exceptions=True)
            assert all(isinstance(r, Unavailable) and address in r.message for r in results), results
        finally:
            await stream.close()
            await server.stop(0)

    run(go())


def test_a_dead_peer_fails_fast_and_a_new_peer_on_the_same_address_is_reached_by_reconnecting():
    async def go():
        server, address = await serve(echo)
        stream = StageStream(address, LinkSettings(step_timeout_ms=5000))
        try:
            assert list((await stream.step(request())).token_ids) == [7]
            await server.stop(0)
            with pytest.raises(Unavailable, match=address):
                await stream.step(request())
            server, _ = await serve(echo, int(address.rsplit(":", 1)[1]))  # the same address, a new server
            assert list((await stream.step(request())).token_ids) == [7]
            assert stream.connections >= 2
        finally:
            await stream.close()
            await server.stop(0)

    run(go())


def test_the_window_bounds_the_steps_in_flight():
    async def go():
        release = asyncio.Event()
        seen = 0

        async def held(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            nonlocal seen
            pending = []
            async for raw in requests:
                seen += 1
                pending.append(worker_pb2.ForwardRequest.FromString(raw).step_id)
                if len(pending) == 2:
                    await release.wait()
                    for step_id in pending:
                        yield worker_pb2.ForwardResponse(step_id=step_id).SerializeToString()
                    pending.clear()

        server, address = await serve(held)
        stream = StageStream(address, LinkSettings(step_timeout_ms=10_000, window=2))
        try:
            steps = [asyncio.ensure_future(stream.step(request())) for _ in range(4)]
            await asyncio.sleep(0.5)
            assert seen == 2 and stream.in_flight == 2  # the other two wait for room, not in a queue
            release.set()
            await asyncio.gather(*steps)
            assert seen == 4
        finally:
            await stream.close()
            await server.stop(0)

    run(go())
