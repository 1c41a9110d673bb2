"""Streams to the next stages. One long-lived Forward stream per next-stage address, shared by every
upstream caller; many steps in flight on it, matched to their replies by a link-local step id."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from shardline.codec import RawTensor, tensor_field_bytes
from shardline.errors import Unavailable
from shardline.server import channel
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)


HIDDEN_FIELD = worker_pb2.ForwardRequest.DESCRIPTOR.fields_by_name["hidden"].number
FORWARD = "/" + worker_pb2.DESCRIPTOR.services_by_name["ShardWorker"].full_name + "/Forward"


@dataclass(frozen=True)
class Outgoing:
    """A ForwardRequest and its hidden states, kept apart until they go on the wire."""

    request: worker_pb2.ForwardRequest
    hidden: RawTensor | None

    def serialize(self) -> bytes:
        head = self.request.SerializeToString()
        return head if self.hidden is None else head + tensor_field_bytes(HIDDEN_FIELD, self.hidden)


class Link:
    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = channel(target)
        self._queue: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[worker_pb2.ForwardResponse]] = {}
        self._ids = itertools.count(1)
        self.broken = False
        forward = self._channel.stream_stream(FORWARD, request_serializer=Outgoing.serialize,
                                              response_deserializer=worker_pb2.ForwardResponse.FromString)
        self._call = forward(self._requests())
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[Outgoing]:
        while (msg := await self._queue.get()) is not None:
            yield msg

    async def _read(self) -> None:
        reason = "the stream ended"
        try:
            async for response in self._call:
                future = self._pending.pop(response.step_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.RpcError as err:
            reason = f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            reason = "the link was closed"
        finally:
            self.broken = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(Unavailable(f"next stage {self.target} is unreachable ({reason})"))
            self._pending.clear()

    def send(self, request: worker_pb2.ForwardRequest,
             hidden: RawTensor | None = None) -> asyncio.Future[worker_pb2.ForwardResponse]:
        """Queue a request with its hidden states (its step_id is replaced by a link-local one); the
        future gets its reply."""
        step_id = next(self._ids)
        request.step_id = step_id
        future: asyncio.Future[worker_pb2.ForwardResponse] = asyncio.get_running_loop().create_future()
        self._pending[step_id] = future
        self._queue.put_nowait(Outgoing(request, hidden))
        return future

    async def close(self) -> None:
        self._queue.put_nowait(None)
        self._reader.cancel()
        await self._channel.close(None)


class Links:
    """The links of one worker, opened on first use and reopened after a failure."""

    def __init__(self) -> None:
        self._links: dict[str, Link] = {}

    def get(self, target: str) -> Link:
        link = self._links.get(target)
        if link is None or link.broken:
            link = self._links[target] = Link(target)
        return link

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()
        self._links.clear()
