"""The coordinator's calls to workers outside the data plane, each with a deadline: what a worker holds
(probe), loading and unloading a shard, and its status."""

from __future__ import annotations

import asyncio
import logging

import grpc

from coordinator.fleet.membership import LoadedShard
from coordinator.fleet.planner import StagePlan
from coordinator.fleet.registry import WorkerRecord
from coordinator.serving.streams import KVBudget
from shardline.codec import dtype_from_enum
from shardline.errors import from_rpc_error
from shardline.fencing import control_metadata
from shardline.server import channel
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


async def status(address: str, timeout: float, links: LinkSettings) -> worker_pb2.GetStatusResponse | None:
    """A worker's status, or None if it does not answer within `timeout`."""
    try:
        async with channel(address, links.keepalive, links.identity) as ch:
            reply: worker_pb2.GetStatusResponse = await worker_pb2_grpc.ShardWorkerStub(ch).GetStatus(
                worker_pb2.GetStatusRequest(), timeout=timeout, metadata=links.identity.metadata)
            return reply
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            log.error("worker %s refused the coordinator: %s", address, err.details())
    except TimeoutError:
        pass
    return None


async def set_peers(addresses: list[str], timeout: float, links: LinkSettings,
                    peers: list[str] | None = None) -> list[str]:
    """Tell workers which workers their routes may name (`peers`, default: `addresses`, the plan's chain);
    returns those that did not answer."""
    request = worker_pb2.SetPeersRequest(addresses=addresses if peers is None else peers)

    async def one(address: str) -> None:
        async with channel(address, links.keepalive, links.identity) as ch:
            await worker_pb2_grpc.ShardWorkerStub(ch).SetPeers(
                request, timeout=timeout, metadata=control_metadata(links.identity.metadata, links.epoch))

    results = await asyncio.gather(*(one(a) for a in addresses), return_exceptions=True)
    failed = []
    for address, result in zip(addresses, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("worker %s was not told the plan's workers: %s", address,
                        result.details() if isinstance(result, grpc.RpcError) else result)
            failed.append(address)
    return failed


async def chain_capacity(addresses: list[str], timeout: float, links: LinkSettings,
                         tries: int = 3) -> KVBudget | None:
    """The chain's KV capacity: the smallest stage's blocks (None when a stage keeps no KV, or stays
    silent through `tries` asks, each with a doubled timeout: admission is off then, and each worker still
    refuses what it cannot hold)."""
    replies: list[worker_pb2.GetStatusResponse | None] = [None] * len(addresses)
    for attempt in range(tries):
        silent = [i for i, r in enumerate(replies) if r is None]
        if not silent:
            break
        answers = await asyncio.gather(*(status(addresses[i], timeout * 2**attempt, links) for i in silent))
        for i, answer in zip(silent, answers, strict=True):
            replies[i] = answer
    if any(r is None for r in replies):
        log.warning("KV admission is off for the chain %s: a stage did not answer GetStatus", " -> ".join(addresses))
    kvs = [r.kv for r in replies if r is not None]
    if len(kvs) != len(addresses) or any(kv.blocks_total <= 0 for kv in kvs):
        return None
    if len({kv.block_tokens for kv in kvs}) != 1:
        return None
    # all of a stage's blocks: sessions of a coordinator's previous life were ended when the worker registered
    # again, and this replica's old ones are being ended now (a transient shortfall, never a lasting cut)
    return KVBudget(kvs[0].block_tokens, min(kv.blocks_total for kv in kvs),
                    stage_blocks=tuple(kv.blocks_total for kv in kvs))


async def probe(workers: list[WorkerRecord], timeout: float, links: LinkSettings) -> dict[str, LoadedShard]:
    """Ask every worker what it holds, in parallel; worker id -> its shard (model "" when it holds none), for
    those that answered within `timeout`."""
    replies = await asyncio.gather(*(status(w.address, timeout, links) for w in workers))
    found: dict[str, LoadedShard] = {}
    for worker, reply in zip(workers, replies, strict=True):
        if reply is None:
            continue
        ready = reply.state == worker_pb2.WORKER_STATE_READY
        if not ready:
            found[worker.worker_id] = LoadedShard("", 0, 0)
            continue
        dtype = dtype_from_enum(reply.device.dtype) if reply.device.dtype else ""  # "": an older worker's
        found[worker.worker_id] = LoadedShard(reply.model, reply.start_layer, reply.end_layer, reply.weights_digest,
                                              (dtype, int(reply.quantize), reply.kv.block_tokens))
    return found


async def load_shard(worker: WorkerRecord, model: str, stage: StagePlan, parameters_address: str, dtype: int,
                     timeout: float, links: LinkSettings, progress: dict[str, int],
                     kv: worker_pb2.LoadShardRequest | None = None, digest: str = "") -> None:
    """LoadShard, within `timeout`; progress[address] follows the bytes loaded; `kv` carries the step and KV
    settings; `digest`: the weights the deployment serves (others are refused). Raises the error table's
    exception on failure."""
    request = worker_pb2.LoadShardRequest(model=model, start_layer=stage.start, end_layer=stage.end,
                                          parameters_address=parameters_address, dtype=dtype,  # type: ignore[arg-type]
                                          weights_digest=digest)
    if kv is not None:
        request.MergeFrom(kv)
    async with channel(worker.address, links.keepalive, links.identity) as ch:
        try:
            async for p in worker_pb2_grpc.ShardWorkerStub(ch).LoadShard(
                    request, timeout=timeout,
                    metadata=control_metadata(links.identity.metadata, links.epoch, worker.identity)):
                progress[worker.address] = p.bytes_done
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err


async def unload_shard(worker: WorkerRecord, model: str, timeout: float,
                       links: LinkSettings) -> worker_pb2.UnloadShardResponse:
    """UnloadShard, within `timeout`: the worker frees its weights, KV cache and sessions (only if it holds
    `model`; "" = whatever it holds). Raises the error table's exception on failure (FAILED_PRECONDITION: a
    LoadShard is in progress there, it holds another model, or it is another worker now)."""
    async with channel(worker.address, links.keepalive, links.identity) as ch:
        try:
            reply: worker_pb2.UnloadShardResponse = await worker_pb2_grpc.ShardWorkerStub(ch).UnloadShard(
                worker_pb2.UnloadShardRequest(model=model), timeout=timeout,
                metadata=control_metadata(links.identity.metadata, links.epoch, worker.identity))
            return reply
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
