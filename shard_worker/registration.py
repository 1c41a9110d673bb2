"""Joining a coordinator: register the worker's address and memory budget, then heartbeat; register again
whenever the coordinator has forgotten it (it restarted) or cannot be reached for a while. The loop never
dies: every failure is logged and retried with backoff. `leave` hands the worker's stage over before it exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from shard_worker.device import DeviceSettings, device_proto
from shardline.errors import from_rpc_error
from shardline.fencing import Fence
from shardline.leader import DeadLeaders, Redirect
from shardline.server import channel
from shardline.stream import LinkSettings
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 5.0  # a coordinator that restarts is found again within this
ORPHANS_TIMEOUT_S = 10.0  # ending the sessions a forgotten worker holds, at most
QUICK_RETRY_S = 0.5  # the longest pause between the first 20 tries to reach a coordinator that went away


class Registration:
    def __init__(self, coordinator: str, address: str, memory_budget_bytes: int,
                 links: LinkSettings | None = None, device: DeviceSettings | None = None,
                 forgotten: Callable[[], Awaitable[int]] | None = None,
                 held: Callable[[], coordinator_pb2.HeldShard | None] | None = None,
                 fence: Fence | None = None) -> None:
        # every coordinator's address (comma-separated): with standby coordinators (issue 29), the one that leads
        # takes the registration; a standby answers UNAVAILABLE naming the leader, which is tried next
        self.coordinators = [c.strip() for c in coordinator.split(",") if c.strip()] or [coordinator]
        self.coordinator = self.coordinators[0]
        self.dead = DeadLeaders()  # coordinators found unreachable (shardline/leader.py)
        self.followed = False  # the last failure sent this worker to a named leader (reset by an answer)
        self.address, self.memory_budget_bytes = address, memory_budget_bytes
        self.device = device or DeviceSettings()  # reported at registration: device, its memory, dtype, engine
        self.links = links or LinkSettings()
        self.metadata = self.links.identity.metadata
        # this worker process's identity (never reused: a restart is another) and the coordinator's life it
        # registered in; the worker's servicer refuses control calls of another epoch (shardline/fencing.py)
        self.fence = fence or Fence()
        self.worker_id = ""
        self.leaving = False  # once leaving, a coordinator that forgets this worker is not asked again
        self.interval = 0.2   # between heartbeats: the coordinator's, once registered
        # ends the sessions held, before registering again: a coordinator that forgot this worker (it restarted)
        # did not create them, and its KV capacity must not count them
        self.forgotten = forgotten
        self.held = held  # the shard held now, told at registration (a restarted coordinator adopts it)

    @property
    def identity(self) -> str:
        return self.fence.identity

    @property
    def epoch(self) -> str:
        return self.fence.epoch

    async def run(self) -> None:
        interval, failures = 0.2, 0
        while True:
            # a fresh channel after any failure: it presents the node certificate as it is now (rotated in
            # place), and never retries on a connection that went bad
            async with channel(self.coordinator, self.links.keepalive, self.links.identity) as ch:
                stub = coordinator_pb2_grpc.WorkerRegistryStub(ch)
                while True:
                    try:
                        if await self._beat(stub):
                            return
                        failures, interval, self.followed = 0, self.interval, False
                        if self.worker_id:  # forgotten: register again at once
                            await asyncio.sleep(interval)
                    except grpc.RpcError as err:
                        failures += 1
                        self._log_failure(err, failures)
                        if self._follow(err):  # a standby named the leader: go there now
                            break
                        self.followed = False
                        # a coordinator that restarts is back within seconds: retry soon (0.1 s doubling up to
                        # QUICK_RETRY_S), and after 20 failures with an exponential backoff
                        backoff = min(interval, QUICK_RETRY_S, 0.1 * 2 ** (failures - 1)) if failures <= 20 \
                            else interval * 2 ** min(failures - 20, 8)
                        await asyncio.sleep(min(MAX_BACKOFF_S, backoff))
                        break

    async def _beat(self, stub: coordinator_pb2_grpc.WorkerRegistryStub) -> bool:
        """Register, or heartbeat; True once this worker is done (it left and was let go)."""
        if not self.worker_id:
            if self.leaving:
                return True
            request = coordinator_pb2.RegisterWorkerRequest(
                address=self.address, memory_budget_bytes=self.memory_budget_bytes,
                device=device_proto(self.device, self.device.dtype), identity=self.identity)
            held = self.held() if self.held is not None else None
            if held is not None:
                request.held.CopyFrom(held)
            reply = await stub.RegisterWorker(request, timeout=RPC_TIMEOUT_S, metadata=self.metadata)
            self.worker_id, self.interval = reply.worker_id, reply.heartbeat_interval_ms / 1000
            self.fence.joined(reply.coordinator_epoch)
            log.info("registered with %s as %s", self.coordinator, self.worker_id)
            return False
        beat = await stub.Heartbeat(coordinator_pb2.HeartbeatRequest(
            worker_id=self.worker_id, identity=self.identity, coordinator_epoch=self.epoch),
            timeout=RPC_TIMEOUT_S, metadata=self.metadata)
        if not beat.known:
            if self.leaving:
                return True  # it let this worker go
            restarted = beat.coordinator_epoch and beat.coordinator_epoch != self.epoch
            ended = await self._end_orphans()
            log.warning("coordinator %s %s; registering again%s", self.coordinator,
                        "restarted" if restarted else "does not know this worker",
                        f" (ended the {ended} sessions it had opened here)" if ended else "")
            self.worker_id = ""
            if restarted:
                self.fence.retire()  # that epoch's calls are refused from now on
            else:  # the same coordinator let this worker go (lost): it registers again in the same epoch
                self.fence.epoch = ""
        return False

    async def _end_orphans(self) -> int:
        """The sessions ended before registering again (bounded: a wedged compute thread never stops the
        registration; a failure is logged and the worker registers all the same)."""
        if self.forgotten is None:
            return 0
        try:
            return await asyncio.wait_for(self.forgotten(), ORPHANS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - logged; registering matters more
            log.exception("ending the sessions of a coordinator that forgot this worker failed; registering anyway")
            return 0

    def _follow(self, err: grpc.RpcError) -> bool:
        """After a failed call: the leader a standby named (True: try it at once), else the next coordinator given
        (False: after the usual pause). A leader found unreachable that a standby still names (its lease not lapsed
        yet) is not gone back to (shardline/leader.py)."""
        said = Redirect.of(err)
        if said.standby:
            self.dead.standing_by(self.coordinator)
        lost = not said.standby and err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        if lost and not self.dead.lost(self.coordinator):
            return False  # a standby a moment ago: it is taking over; register with it again after the pause
        leader = said.cluster_address
        if leader and leader != self.coordinator and self.dead.fresh(leader, said.epoch) and not self.followed:
            log.info("coordinator %s stands by; the leader is %s", self.coordinator, leader)
            self.coordinator, self.followed = leader, True  # once in a row: standbys naming each other do not spin
            return True
        # the next one given: this one is unreachable, or a standby that knows no leader at all (it may itself be
        # cut off from etcd while the leader is elsewhere); a standby naming a leader just found dead is waited at
        several = len(self.coordinators) > 1 or self.coordinator not in self.coordinators
        if (not said.standby or not leader) and several:
            at = self.coordinators.index(self.coordinator) if self.coordinator in self.coordinators else -1
            self.coordinator = self.coordinators[(at + 1) % len(self.coordinators)]
        return False

    def _log_failure(self, err: grpc.RpcError, failures: int) -> None:
        if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.error("coordinator %s refused this worker: %s (retrying)", self.coordinator, err.details())
        elif failures % 100 == 0:  # a coordinator still starting is normal; one that stays away is not
            log.warning("coordinator %s unreachable (%d tries): %s", self.coordinator, failures, err.details())

    async def leave(self, timeout_s: float) -> str:
        """Ask the coordinator to hand this worker's stage over; returns once it may exit."""
        self.leaving = True
        if not self.worker_id:
            return "not registered"
        async with channel(self.coordinator, self.links.keepalive, self.links.identity) as ch:
            try:
                reply = await coordinator_pb2_grpc.WorkerRegistryStub(ch).LeaveCluster(
                    coordinator_pb2.LeaveClusterRequest(worker_id=self.worker_id, identity=self.identity,
                                                        coordinator_epoch=self.epoch),
                    timeout=timeout_s, metadata=self.metadata)
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err
        return str(reply.message)
