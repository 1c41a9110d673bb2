"""The fleet's run-time changes in etcd (issue 29.2), the second backend of coordinator/fleet/durable.py's
`FleetState`: with standby coordinators the next leader serves what the last one served (loads, unloads, scale,
promotions), wherever it runs. Keys, under the cluster's prefix and the configuration's digest (as the SQLite
file is named by it): `fleet/<digest>/deployments/<name@version>` (the spec as JSON; empty once unloaded) and
`fleet/<digest>/defaults/<name>` (the default version).

The interface is synchronous (the fleet writes a change before it acknowledges it, on its event loop, as it
does with SQLite): each write is one etcd call with a short deadline. etcd that cannot be reached refuses the
change with UNAVAILABLE naming it; nothing is acknowledged that was not committed. Each write is fenced: it
commits only while the leader key is still the one of this leadership (its create revision, the epoch), so a
deposed leader's late change never overwrites its successor's. The state is read once per leadership, off the
event loop (`load`), trying every endpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from aetcd import rpc  # type: ignore[import-untyped]
from pydantic import ValidationError

from coordinator.config import DeploymentSpec
from coordinator.fleet.durable import Changes, FleetStateError, configuration_digest
from shardline.errors import Unavailable

log = logging.getLogger(__name__)
WRITE_TIMEOUT_S = 1.0  # a change waits this long for etcd, at most (it blocks the fleet's loop meanwhile)
READ_TIMEOUT_S = 2.0  # per endpoint, off the event loop


class EtcdFleetState:
    def __init__(self, endpoints: list[str], prefix: str, configured: list[DeploymentSpec], leader_key: str = "",
                 epoch: int = 0) -> None:
        self.endpoints = endpoints
        self.root = f"{prefix}/fleet/{configuration_digest(configured)}/"
        self.leader_key, self.epoch = leader_key, epoch
        self._at = 0
        self._channel: grpc.Channel | None = None
        self._loaded: Changes | None = None

    def _kv(self) -> Any:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoints[self._at])
        return rpc.KVStub(self._channel)

    def _failed(self, err: grpc.RpcError) -> str:
        where = self.endpoints[self._at]
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._at = (self._at + 1) % len(self.endpoints)
        return f"etcd at {where}: {err.code().name}: {err.details()}"  # type: ignore[attr-defined]

    def load(self) -> Changes:
        """Read the state, trying each endpoint (READ_TIMEOUT_S each); FleetStateError naming the last failure.
        Blocking: run it off the event loop (`asyncio.to_thread`); `changes()` then answers from it."""
        start = self.root.encode()
        failures = []
        for _ in self.endpoints:
            try:
                reply = self._kv().Range(rpc.RangeRequest(key=start, range_end=start[:-1] + b"0"),
                                         timeout=READ_TIMEOUT_S)
                break
            except grpc.RpcError as err:
                failures.append(self._failed(err))
        else:
            raise FleetStateError(f"the fleet state cannot be read from {'; '.join(failures)}")
        changes = Changes()
        for kv in sorted(reply.kvs, key=lambda kv: kv.create_revision):  # in the order the changes were first made
            kind, _, name = kv.key.decode()[len(self.root):].partition("/")
            value = bytes(kv.value).decode()
            if kind == "defaults":
                changes.defaults[name] = value
            elif kind == "deployments":
                try:
                    changes.deployments[name] = DeploymentSpec.model_validate_json(value) if value else None
                except ValidationError as exc:
                    raise FleetStateError(f"the fleet state in etcd holds a record that does not parse ({kv.key!r}: "
                                          f"{exc.errors()[0]['msg']}): delete it with etcdctl to start from the "
                                          "configuration for that deployment") from None
        self._loaded = changes
        return changes

    def changes(self) -> Changes:
        return self._loaded if self._loaded is not None else self.load()

    def _put(self, key: str, value: str) -> None:
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=(self.root + key).encode(), value=value.encode()))
        fence = [rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=self.leader_key.encode(),
                             create_revision=self.epoch)] if self.leader_key else []
        try:
            reply = self._kv().Txn(rpc.TxnRequest(compare=fence, success=[put]), timeout=WRITE_TIMEOUT_S)
        except grpc.RpcError as err:
            raise Unavailable(f"the change cannot be committed to the fleet state ({self._failed(err)}): it is "
                              "refused, and what is deployed keeps serving; try again once etcd answers") from None
        if not reply.succeeded:
            raise Unavailable(f"this coordinator no longer leads (its epoch {self.epoch} ended): the change is "
                              "refused; send it again (the SDK goes to the new leader)")

    def deployed(self, spec: DeploymentSpec) -> None:
        self._put(f"deployments/{spec.key}", spec.model_dump_json())

    def unloaded(self, key: str) -> None:
        self._put(f"deployments/{key}", "")

    def promoted(self, name: str, version: str) -> None:
        self._put(f"defaults/{name}", version)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


__all__ = ["EtcdFleetState"]
