"""etcd, as the coordinators of one cluster use it (issue 29): a connection to etcd's v3 gRPC API with a deadline on
every call, and the few operations an election and the fleet's state need.

The messages and stubs are those of `aetcd` (a maintained asyncio client of etcd v3, on grpcio like the rest of
shardline); the calls are made here, on a channel of our own, so that each has a deadline and each failure names
the endpoint and the reason in one line (`EtcdUnavailable`). Several endpoints (the members of one etcd cluster)
are tried in turn: a call that cannot reach one moves to the next.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc  # type: ignore[import-untyped]

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 2.0  # one call to etcd: an election step, a lease refresh, a read or a write of fleet state


class EtcdUnavailable(Exception):
    """etcd cannot be used now: the message names the endpoint and the reason; `code` is the gRPC status's name
    (NOT_FOUND for a lease that is gone, UNAVAILABLE or DEADLINE_EXCEEDED when no member answered)."""

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code


TRANSPORT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode(), bytes(kv.value), kv.create_revision, kv.mod_revision, kv.lease)


class Etcd:
    """A connection to one etcd cluster. Every call has a deadline (CALL_TIMEOUT_S unless given); a call that
    fails for want of a reachable member raises EtcdUnavailable and the next call tries the next endpoint."""

    def __init__(self, endpoints: list[str], timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.endpoints, self.timeout_s = endpoints, timeout_s
        self._at = 0
        self._channel: grpc.aio.Channel | None = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._at]

    def _stubs(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.endpoint)
        return self._channel

    async def _failed(self, err: grpc.aio.AioRpcError) -> EtcdUnavailable:
        where = self.endpoint
        if err.code() in TRANSPORT and len(self.endpoints) > 1 and where == self.endpoint:
            # no member answered here: the next call dials the next one (a call that is still in flight on this
            # channel ends on its own deadline)
            self._at = (self._at + 1) % len(self.endpoints)
            channel, self._channel = self._channel, None
            if channel is not None:
                asyncio.get_running_loop().call_later(self.timeout_s, lambda: asyncio.ensure_future(
                    channel.close(None)))
        return EtcdUnavailable(f"etcd at {where}: {err.code().name}: {err.details()}", err.code().name)

    async def _call(self, stub: str, method: str, request: Any, timeout_s: float | None = None) -> Any:
        channel = self._stubs()
        call = getattr(getattr(rpc, f"{stub}Stub")(channel), method)
        try:
            return await call(request, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise await self._failed(err) from None

    async def check(self) -> str:
        """The version of the member that answered; EtcdUnavailable naming the endpoint and why otherwise."""
        status = await self._call("Maintenance", "Status", rpc.StatusRequest())
        return str(status.version)

    async def get(self, key: str) -> KeyValue | None:
        reply = await self._call("KV", "Range", rpc.RangeRequest(key=key.encode()))
        return _kv(reply.kvs[0]) if reply.kvs else None

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """The revision of the write."""
        reply = await self._call("KV", "Put", rpc.PutRequest(key=key.encode(), value=value, lease=lease))
        return int(reply.header.revision)

    async def create(self, key: str, value: bytes, lease: int) -> tuple[bool, KeyValue | None]:
        """Put `key` only if it does not exist: (True, the new key) or (False, the key that exists)."""
        absent = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key.encode(),
                             create_revision=0)
        request = rpc.TxnRequest(
            compare=[absent],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value, lease=lease)),
                     rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))])
        reply = await self._call("KV", "Txn", request)
        ranged = reply.responses[-1].response_range.kvs
        return bool(reply.succeeded), (_kv(ranged[0]) if ranged else None)

    async def delete_if(self, key: str, create_revision: int) -> bool:
        """Delete `key` if it is still the one created at `create_revision` (never a successor's)."""
        same = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key.encode(),
                           create_revision=create_revision)
        reply = await self._call("KV", "Txn", rpc.TxnRequest(
            compare=[same], success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))]))
        return bool(reply.succeeded)

    async def grant(self, ttl_s: int) -> int:
        reply = await self._call("Lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl_s))
        if reply.error:
            raise EtcdUnavailable(f"etcd at {self.endpoint} granted no lease: {reply.error}")
        return int(reply.ID)

    async def keep_alive(self, lease: int) -> int:
        """Refresh the lease once; its TTL left (0 or less: the lease is gone)."""
        channel = self._stubs()
        call = rpc.LeaseStub(channel).LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
                                                     timeout=self.timeout_s)
        try:
            async for reply in call:
                return int(reply.TTL)
        except grpc.aio.AioRpcError as err:
            raise await self._failed(err) from None
        finally:
            call.cancel()
        return 0

    async def revoke(self, lease: int) -> None:
        await self._call("Lease", "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None


__all__ = ["CALL_TIMEOUT_S", "Etcd", "EtcdUnavailable", "KeyValue"]
