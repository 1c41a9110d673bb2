"""Driving a chain of loaded workers: steps go into the first stage on the one stage-stream primitive, with
the rest of the route; the stages pass them on among themselves."""

from __future__ import annotations

import asyncio
import logging

import grpc

from shardline.errors import code_from_number, error_for_code
from shardline.fencing import control_metadata
from shardline.server import channel
from shardline.stream import LinkSettings, StageStream
from shardline.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
END_SESSION_TIMEOUT_S = 5.0


class ChainClient:
    """Sends steps into a chain of stages; many may be in flight, each matched to its reply by step id."""

    def __init__(self, addresses: list[str], settings: LinkSettings | None = None) -> None:
        if not addresses:
            raise ValueError("a chain needs at least one stage")
        self.addresses = addresses
        self.settings = settings or LinkSettings()
        self.first = StageStream(addresses[0], self.settings)

    async def step(self, sequences: list[worker_pb2.SequenceSlice], token_ids: list[int],
                   output: worker_pb2.OutputKind = worker_pb2.OUTPUT_KIND_TOKENS,
                   partial: bool = False) -> worker_pb2.ForwardResponse:
        """One step through the chain. A failed message raises its error; so does a failed sequence, unless
        `partial` (the caller then reads `sequence_errors`, and the results cover the other sequences)."""
        request = worker_pb2.ForwardRequest(sequences=sequences, token_ids=token_ids, start_layer=0,
                                            route=self.addresses[1:], output=output)
        response = await self.first.step(request)
        if response.HasField("error"):
            raise error_for_code(code_from_number(response.error.code), response.error.message)
        if response.sequence_errors and not partial:
            first = response.sequence_errors[0].error
            raise error_for_code(code_from_number(first.code), first.message)
        return response

    async def close(self) -> None:
        await self.first.close()


async def end_sessions(addresses: list[str], sessions: list[str], settings: LinkSettings | None = None) -> None:
    """Free the sessions' KV caches on the given workers (best effort, bounded: a worker that is gone has
    nothing to free)."""
    if not sessions or not addresses:
        return
    request = worker_pb2.EndSessionRequest(session_ids=sessions)
    links = settings or LinkSettings()

    async def end(address: str) -> None:
        async with channel(address, links.keepalive, links.identity) as ch:
            await worker_pb2_grpc.ShardWorkerStub(ch).EndSession(
                request, timeout=END_SESSION_TIMEOUT_S, metadata=control_metadata(links.identity.metadata, links.epoch))

    results = await asyncio.gather(*(end(a) for a in addresses), return_exceptions=True)
    for address, result in zip(addresses, results, strict=True):
        if isinstance(result, grpc.RpcError):
            log.info("could not end %d sessions on %s (%s): a worker that is gone holds nothing", len(sessions),
                     address, result.code().name)
        elif isinstance(result, BaseException):
            log.warning("ending sessions on %s failed: %s", address, result)
