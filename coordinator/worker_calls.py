"""The coordinator's calls to workers outside the data plane, each with a deadline: what a worker holds
(probe), loading a shard, and its status."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from coordinator.membership import LoadedShard
from coordinator.planner import StagePlan
from coordinator.registry import WorkerRecord
from coordinator.scheduler import KVBudget
from shardline.errors import from_rpc_error
from shardline.server import Keepalive, channel
from shardline.v1 import worker_pb2, worker_pb2_grpc


async def status(address: str, timeout: float, keepalive: Keepalive) -> worker_pb2.GetStatusResponse | None:
    """A worker's status, or None if it does not answer within `timeout`."""
    with contextlib.suppress(grpc.RpcError, asyncio.TimeoutError):
        async with channel(address, keepalive) as ch:
            reply: worker_pb2.GetStatusResponse = await worker_pb2_grpc.ShardWorkerStub(ch).GetStatus(
                worker_pb2.GetStatusRequest(), timeout=timeout)
            return reply
    return None


async def chain_capacity(addresses: list[str], timeout: float, keepalive: Keepalive) -> KVBudget | None:
    """The chain's KV capacity: the smallest stage's blocks (None when a stage keeps no KV, or is silent;
    each worker still refuses what it cannot hold)."""
    replies = await asyncio.gather(*(status(a, timeout, keepalive) for a in addresses))
    kvs = [r.kv for r in replies if r is not None]
    if len(kvs) != len(addresses) or any(kv.blocks_total <= 0 for kv in kvs):
        return None
    if len({kv.block_tokens for kv in kvs}) != 1:
        return None
    return KVBudget(kvs[0].block_tokens, min(kv.blocks_total for kv in kvs))


async def probe(workers: list[WorkerRecord], timeout: float, keepalive: Keepalive) -> dict[str, LoadedShard]:
    """Ask every worker what it holds, in parallel; worker id -> its shard (model "" when it holds none), for
    those that answered within `timeout`."""
    replies = await asyncio.gather(*(status(w.address, timeout, keepalive) for w in workers))
    found: dict[str, LoadedShard] = {}
    for worker, reply in zip(workers, replies, strict=True):
        if reply is None:
            continue
        ready = reply.state == worker_pb2.WORKER_STATE_READY
        found[worker.worker_id] = LoadedShard(reply.model, reply.start_layer, reply.end_layer) if ready \
            else LoadedShard("", 0, 0)
    return found


async def load_shard(worker: WorkerRecord, model: str, stage: StagePlan, parameters_address: str, dtype: int,
                     timeout: float, keepalive: Keepalive, progress: dict[str, int],
                     kv: worker_pb2.LoadShardRequest | None = None) -> None:
    """LoadShard, within `timeout`; progress[address] follows the bytes loaded; `kv` carries the step and KV
    settings. Raises the error table's exception on failure."""
    request = worker_pb2.LoadShardRequest(model=model, start_layer=stage.start, end_layer=stage.end,
                                          parameters_address=parameters_address, dtype=dtype)  # type: ignore[arg-type]
    if kv is not None:
        request.MergeFrom(kv)
    async with channel(worker.address, keepalive) as ch:
        try:
            async for p in worker_pb2_grpc.ShardWorkerStub(ch).LoadShard(request, timeout=timeout):
                progress[worker.address] = p.bytes_done
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
