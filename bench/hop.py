"""Activation hop: what shardline's worker-to-worker transport costs over raw grpc.aio, same run.

shardline path: the real `StageStream` a worker uses to reach the next stage sends ForwardRequests carrying a
hidden-state Tensor to a server that decodes it exactly as the worker's servicer does (proto -> domain
Step -> torch tensor) and replies with one token id, as the route's end does. No layer compute: this
isolates the hop. Baseline: a raw grpc.aio bidi stream carrying bytes messages of the same size, each
answered with 8 bytes.

    python bench/hop.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from shard_worker.runtime import StepResult, torch_from_raw  # noqa: E402
from shard_worker.servicer import response_from_result, step_from_proto  # noqa: E402
from shardline.codec import from_numpy  # noqa: E402
from shardline.server import bind, channel, new_server  # noqa: E402
from shardline.stream import StageStream  # noqa: E402
from shardline.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402


class EdgeOnlyWorker(worker_pb2_grpc.ShardWorkerServicer):
    async def Forward(self, request_iterator: Any, context: Any) -> AsyncIterator[worker_pb2.ForwardResponse]:
        async for req in request_iterator:
            step = step_from_proto(req)
            assert step.hidden is not None
            torch_from_raw(step.hidden)  # what the runtime does with its input before the layers
            yield response_from_result(req.step_id, StepResult(token_ids=[1]), [])


async def echo(request_iterator: Any, context: Any) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        yield message[:8]  # a small reply, as a real hop gets


async def start_servers() -> tuple[grpc.aio.Server, int, int]:
    server = new_server()
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(EdgeOnlyWorker(), server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})])
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    return server, port, port


class RawEcho:
    def __init__(self, target: str) -> None:
        self.channel = channel(target)
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiters: list[asyncio.Future[bytes]] = []
        call = self.channel.stream_stream("/bench.Echo/Echo")(self._requests())
        self.reader = asyncio.create_task(self._read(call))

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            yield await self.queue.get()

    async def _read(self, call: Any) -> None:
        async for message in call:
            self.waiters.pop(0).set_result(message)

    def send(self, payload: bytes) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        self.queue.put_nowait(payload)
        return future


async def timed(send: Callable[[], Awaitable[Any]], count: int, in_flight: int) -> float:
    """Seconds for `count` round trips with at most `in_flight` outstanding."""
    began = time.perf_counter()
    pending: set[asyncio.Future[Any]] = set()
    for _ in range(count):
        if len(pending) >= in_flight:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(asyncio.ensure_future(send()))
    await asyncio.gather(*pending)
    return time.perf_counter() - began


async def main() -> None:
    server, port, _ = await start_servers()
    target = f"127.0.0.1:{port}"
    link, raw = StageStream(target), RawEcho(target)
    cases = [("2 KB, one at a time (latency)", 512, 1, 400), ("16 MB, 4 in flight (bandwidth)", 4096 * 1024, 4, 24)]
    print("| payload | raw grpc.aio echo | shardline hop | ratio (shardline / raw) |")
    print("|---|---:|---:|---:|")
    for label, floats, in_flight, count in cases:
        hidden = np.random.default_rng(0).standard_normal((1, floats), dtype=np.float32)
        raw_hidden = from_numpy(hidden)
        payload = raw_hidden.data
        sequence = worker_pb2.SequenceSlice(session_id="s", start_position=0, num_tokens=1)

        def shardline_send(sequence: Any = sequence, hidden: Any = raw_hidden) -> Awaitable[Any]:
            return link.step(worker_pb2.ForwardRequest(sequences=[sequence], start_layer=1), hidden)

        def raw_send(payload: bytes = payload) -> Awaitable[Any]:
            return raw.send(payload)

        await timed(raw_send, 5, in_flight)
        await timed(shardline_send, 5, in_flight)
        raw_runs, ours_runs = [], []
        for _ in range(3):  # interleaved, median of three
            raw_runs.append(await timed(raw_send, count, in_flight))
            ours_runs.append(await timed(shardline_send, count, in_flight))
        raw_s, ours_s = statistics.median(raw_runs), statistics.median(ours_runs)
        if in_flight == 1:
            cells = f"{raw_s / count * 1e6:.0f} µs/round trip | {ours_s / count * 1e6:.0f} µs/round trip"
            ratio = ours_s / raw_s
            print(f"| {label} | {cells} | {ratio:.2f}x the time |")
        else:
            mb = len(payload) * count / 1e6
            cells = f"{mb / raw_s:.0f} MB/s | {mb / ours_s:.0f} MB/s"
            print(f"| {label} | {cells} | {raw_s / ours_s:.2f}x the bandwidth |")
    raw.reader.cancel()
    await link.close()
    await raw.channel.close(None)
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
