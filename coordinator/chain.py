"""Driving a chain of loaded workers: one long-lived Forward stream into the first stage, the route on."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from shardline.errors import Unavailable, code_from_number, error_for_code
from shardline.server import channel
from shardline.v1 import worker_pb2, worker_pb2_grpc


class ChainClient:
    """Sends steps into a chain of stages; many may be in flight, each matched to its reply by step id."""

    def __init__(self, addresses: list[str]) -> None:
        if not addresses:
            raise ValueError("a chain needs at least one stage")
        self.addresses = addresses
        self._channel = channel(addresses[0])
        self._queue: asyncio.Queue[worker_pb2.ForwardRequest | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[worker_pb2.ForwardResponse]] = {}
        self._ids = itertools.count(1)
        self._call = worker_pb2_grpc.ShardWorkerStub(self._channel).Forward(self._requests())
        self._reader = asyncio.create_task(self._read())
        self._channels = {addresses[0]: self._channel}  # one per stage, opened on first use

    async def _requests(self) -> AsyncIterator[worker_pb2.ForwardRequest]:
        while (msg := await self._queue.get()) is not None:
            yield msg

    async def _read(self) -> None:
        try:
            async for response in self._call:
                future = self._pending.pop(response.step_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(Unavailable(f"the stream to the first stage {self.addresses[0]} ended"))

    async def step(self, sequences: list[worker_pb2.SequenceSlice], token_ids: list[int],
                   output: worker_pb2.OutputKind = worker_pb2.OUTPUT_KIND_TOKENS) -> worker_pb2.ForwardResponse:
        step_id = next(self._ids)
        future: asyncio.Future[worker_pb2.ForwardResponse] = asyncio.get_running_loop().create_future()
        self._pending[step_id] = future
        self._queue.put_nowait(worker_pb2.ForwardRequest(
            step_id=step_id, sequences=sequences, token_ids=token_ids, start_layer=0,
            route=self.addresses[1:], output=output))
        response = await future
        if response.HasField("error"):
            raise error_for_code(code_from_number(response.error.code), response.error.message)
        return response

    def stub(self, address: str) -> worker_pb2_grpc.ShardWorkerStub:
        if address not in self._channels:
            self._channels[address] = channel(address)
        return worker_pb2_grpc.ShardWorkerStub(self._channels[address])

    async def end_sessions(self, sessions: list[str]) -> None:
        """Free the sessions' KV caches on every stage (best effort: a stage that is gone has nothing to free)."""
        request = worker_pb2.EndSessionRequest(session_ids=sessions)
        await asyncio.gather(*(self.stub(a).EndSession(request, timeout=10) for a in self.addresses),
                             return_exceptions=True)

    async def close(self) -> None:
        self._queue.put_nowait(None)
        self._reader.cancel()
        for ch in self._channels.values():
            await ch.close(None)
