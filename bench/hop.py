"""Activation hop: what shardline's worker-to-worker transport costs over raw grpc.aio, same run.

shardline path: the real `StageStream` a worker uses to reach the next stage sends ForwardRequests carrying a
hidden-state tensor to a real shard worker (`start_worker`: its server, interceptors, Forward handler and
(de)serializers, the relay's `submit`, route checks and compute thread), whose stage does no layer compute:
its runtime turns the received bytes into a torch tensor (what a stage does before its layers) and answers
with one token id, as the route's end does, or, in the round-trip case, with the hidden states themselves.
Baseline: a raw grpc.aio bidi stream of bytes messages of the same size on the same server, answered with 8
bytes (or echoed whole in the round-trip case).

    python bench/hop.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from shard_worker.lifecycle import Shard  # noqa: E402
from shard_worker.runtime import KVSettings, Metrics, Step, StepResult, torch_from_raw  # noqa: E402
from shard_worker.server import start_worker  # noqa: E402
from shard_worker.weights import ShardSpec  # noqa: E402
from shardline.codec import from_numpy  # noqa: E402
from shardline.server import channel  # noqa: E402
from shardline.stream import StageStream  # noqa: E402
from shardline.v1 import worker_pb2  # noqa: E402


@dataclass
class HopStage:
    start: int = 1
    end: int = 2
    is_first: bool = False
    is_last: bool = True


class HopRuntime:
    """A last stage with no layers: the hop, without compute. Runs on the worker's compute thread."""

    def __init__(self) -> None:
        self.stage = HopStage()
        self.metrics = Metrics()
        self.settings = KVSettings()

    def expire(self) -> int:
        return 0

    def step(self, step: Step) -> StepResult:
        assert step.hidden is not None
        torch_from_raw(step.hidden)  # what the runtime does with its input before the layers
        if step.output == "hidden":
            return StepResult(tensor=step.hidden, kept=[0])
        return StepResult(token_ids=[1], kept=[0])


async def echo(request_iterator: Any, context: Any) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        yield message if len(message) > 1 and message[0] == 1 else message[:8]  # first byte 1: echo it all


async def start_servers() -> Any:
    worker = await start_worker()
    runtime: Any = HopRuntime()
    worker.servicer.lifecycle.shard = Shard(ShardSpec("hop", 1, 2, "float32", ""), runtime, 0)
    worker.servicer.lifecycle.state = "ready"
    worker.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})])
    return worker


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


CASES = [  # label, float32 values, steps in flight, round trips per run, the hidden states come back
    ("2 KB, one at a time (latency)", 512, 1, 400, False),
    ("16 MB, 4 in flight (bandwidth)", 4096 * 1024, 4, 24, False),
    ("16 MB each way, 2 in flight (round trip)", 4096 * 1024, 2, 12, True),
]


async def main(rounds: int, cases: list[int]) -> None:
    worker = await start_servers()
    target = worker.address
    link, raw = StageStream(target), RawEcho(target)
    print("| payload | raw grpc.aio | shardline hop (real worker Forward) | ratio | runs (raw / shardline) |")
    print("|---|---:|---:|---:|---|")
    for label, floats, in_flight, count, back in [CASES[i] for i in cases]:
        hidden = np.random.default_rng(0).standard_normal((1, floats), dtype=np.float32)
        raw_hidden = from_numpy(hidden)
        payload = (b"\x01" if back else b"\x00") + raw_hidden.data[1:]
        output = worker_pb2.OUTPUT_KIND_HIDDEN if back else worker_pb2.OUTPUT_KIND_TOKENS
        sequence = worker_pb2.SequenceSlice(session_id="s", start_position=0, num_tokens=1)

        async def shardline_send(sequence: Any = sequence, hidden: Any = raw_hidden, output: Any = output) -> Any:
            response = await link.step(worker_pb2.ForwardRequest(sequences=[sequence], start_layer=1, output=output),
                                       hidden)
            if response.HasField("error"):
                raise RuntimeError(response.error.message)
            return response

        def raw_send(payload: bytes = payload) -> Awaitable[Any]:
            return raw.send(payload)

        reply = await shardline_send()  # warm-up, and the reply is what was asked for
        assert (reply.tensor.data == raw_hidden.data) if back else list(reply.token_ids) == [1]
        await timed(raw_send, 5, in_flight)
        await timed(shardline_send, 5, in_flight)
        raw_runs, ours_runs = [], []
        for _ in range(rounds):  # interleaved, median
            raw_runs.append(await timed(raw_send, count, in_flight))
            ours_runs.append(await timed(shardline_send, count, in_flight))
        raw_s, ours_s = statistics.median(raw_runs), statistics.median(ours_runs)
        if in_flight == 1:
            runs = ", ".join(f"{s / count * 1e6:.0f}" for s in raw_runs) + " / " + ", ".join(
                f"{s / count * 1e6:.0f}" for s in ours_runs)
            print(f"| {label} | {raw_s / count * 1e6:.0f} µs/round trip | {ours_s / count * 1e6:.0f} µs/round trip "
                  f"| {ours_s / raw_s:.2f}× the time | {runs} µs |")
        else:
            mb = len(payload) * count / 1e6
            runs = ", ".join(f"{mb / s:.0f}" for s in raw_runs) + " / " + ", ".join(f"{mb / s:.0f}" for s in ours_runs)
            print(f"| {label} | {mb / raw_s:.0f} MB/s | {mb / ours_s:.0f} MB/s | {raw_s / ours_s:.2f}× the bandwidth "
                  f"| {runs} MB/s |")
    raw.reader.cancel()
    await link.close()
    await raw.channel.close(None)
    await worker.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", type=int, nargs="*", default=list(range(len(CASES))), help="which rows")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.cases))
