"""Which coordinator leads: etcd's election recipe (a key created under a lease, only if absent), never a
home-made one. The candidate that creates the key leads for as long as its lease lives; the others watch the
key and try again when it is gone (deleted by a leader that stepped down, or expired with its lease).

A leader keeps its lease alive every ttl/3 and counts itself deposed as soon as it cannot know the lease is
alive: etcd says it is gone, or no refresh succeeded for `ttl` since the last that did (etcd unreachable: by
then etcd may have let the lease lapse and elected another). Each leadership's epoch is the create revision of
its key, which etcd makes larger for every new leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

from coordinator.ha.etcd import Etcd, EtcdUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leader:
    """Who leads: its public API address, the address workers register on, and its epoch."""

    address: str
    cluster_address: str
    epoch: int

    def encode(self) -> bytes:
        return json.dumps({"address": self.address, "cluster_address": self.cluster_address}).encode()

    @classmethod
    def decode(cls, value: bytes, epoch: int) -> Leader:
        try:
            fields = json.loads(value)
            return cls(str(fields["address"]), str(fields["cluster_address"]), epoch)
        except (ValueError, KeyError, TypeError):
            return cls("", "", epoch)  # another release's record: a leader all the same, address unknown


class Election:
    """One candidate's view of the election at `key` (the cluster's prefix + "/leader")."""

    def __init__(self, etcd: Etcd, key: str, me: Leader, ttl_s: int, poll_s: float | None = None) -> None:
        self.etcd, self.key, self.me, self.ttl_s = etcd, key, me, ttl_s
        self.poll_s = poll_s if poll_s is not None else min(0.25, ttl_s / 8)
        self.lease = 0
        self.epoch = 0  # of this candidate's leadership; 0 while it does not lead
        self.leader: Leader | None = None  # the last leader seen (itself, while it leads)
        self.lost = asyncio.Event()  # set when a leadership ends (deposed, or resigned)
        self.alive_until = 0.0  # monotonic time until which the lease is known alive (while leading)
        self.refreshed = 0.0  # when the last grant or refresh etcd answered was sent
        self._keeper: asyncio.Task[None] | None = None

    async def current(self) -> Leader | None:
        """The leader as etcd has it now (EtcdUnavailable when it cannot say)."""
        kv = await self.etcd.get(self.key)
        self.leader = Leader.decode(kv.value, kv.create_revision) if kv is not None else None
        return self.leader

    async def campaign(self, stopping: asyncio.Event | None = None) -> int:
        """Return once this candidate leads (its epoch); waits while another does, and while etcd cannot be
        reached (logged once a minute). Cancel to stop campaigning."""
        last_log = float("-inf")
        while stopping is None or not stopping.is_set():
            try:
                if not self.lease:
                    sent = time.monotonic()
                    self.lease = await self.etcd.grant(self.ttl_s)
                    self.refreshed = sent
                won, kv = await self.etcd.create(self.key, self.me.encode(), self.lease)
                # a create whose answer was lost, tried again, finds the key under its own lease: won all the same
                if kv is not None and (won or kv.lease == self.lease):
                    sent = time.monotonic()  # the lease refreshed now: its life counted from a known send
                    if await self.etcd.keep_alive(self.lease) > 0:
                        self.refreshed = sent
                        return self._won(kv.create_revision)
                    self.lease = 0  # lapsed as we won: its key is gone with it; campaign again
                    continue
                self.leader = Leader.decode(kv.value, kv.create_revision) if kv is not None else None
                # our own lease stays alive while we wait, so that it is ready when the key is free
                sent = time.monotonic()
                if await self.etcd.keep_alive(self.lease) <= 0:
                    self.lease = 0
                else:
                    self.refreshed = sent
            except EtcdUnavailable as exc:
                self.leader = None  # not known while etcd cannot say: a standby says no leader rather than a stale one
                if exc.code == "NOT_FOUND":  # our lease lapsed meanwhile (a pause, a partition): a new one next
                    self.lease = 0
                if time.monotonic() - last_log >= 60:
                    log.warning("cannot campaign for leadership: %s (trying again)", exc)
                    last_log = time.monotonic()
            await asyncio.sleep(self.poll_s)
        raise asyncio.CancelledError

    def _won(self, epoch: int) -> int:
        self.epoch = epoch
        self.leader = Leader(self.me.address, self.me.cluster_address, epoch)
        self.lost = asyncio.Event()
        # alive from the last refresh that etcd took (sent then: etcd counts from later)
        self.alive_until = self.refreshed + self.ttl_s
        self._keeper = asyncio.create_task(self._keep(), name="shardline-lease")
        log.info("leading (epoch %d, lease %x, ttl %d s)", epoch, self.lease, self.ttl_s)
        return epoch

    @property
    def margin_s(self) -> float:
        """How long before the lease could lapse a leader steps down: time to stop serving before a successor can
        be elected."""
        return min(1.0, self.ttl_s / 4)

    async def _keep(self) -> None:
        """Refresh the lease every ttl/3; set `lost` once it cannot be known alive. Alive is counted from when
        a refresh was sent (etcd counts from when it got it: later), and the leader steps down `margin_s` before
        that runs out, so it has stopped serving before etcd can elect another, also after a pause (SIGSTOP)."""
        try:
            while True:
                await asyncio.sleep(max(0.0, min(self.ttl_s / 3, self.alive_until - self.margin_s - time.monotonic())))
                sent = time.monotonic()
                left = self.alive_until - self.margin_s - sent
                if left <= 0:
                    log.error("stepping down: the lease was not refreshed for %.1f s (etcd cannot be reached, or this "
                              "process was paused)", sent - (self.alive_until - self.ttl_s))
                    return
                try:
                    async with asyncio.timeout(left):
                        ttl = await self.etcd.keep_alive(self.lease)
                except (EtcdUnavailable, TimeoutError) as exc:
                    log.warning("refreshing the leader's lease failed: %s (stepping down in %.1f s unless it "
                                "succeeds)", exc or "no answer", self.alive_until - self.margin_s - time.monotonic())
                    await asyncio.sleep(min(0.1, max(0.0, self.alive_until - self.margin_s - time.monotonic())))
                    continue
                if ttl <= 0:
                    log.error("stepping down: etcd says the leader's lease is gone")
                    return
                self.refreshed = sent
                self.alive_until = sent + ttl
        finally:
            self._deposed()

    def leading(self) -> bool:
        """Whether this candidate may act as the leader now (its lease known alive, with the margin)."""
        return bool(self.epoch) and time.monotonic() < self.alive_until - self.margin_s

    def _deposed(self) -> None:
        if self.leader is not None and self.leader.address == self.me.address:
            self.leader = None  # never named as the leader once it is not
        self.epoch, self.lease, self.alive_until = 0, 0, 0.0
        self.lost.set()

    async def resign(self) -> None:
        """Step down now (a stop): the key is deleted if still ours, so a standby takes over at once rather than
        when the lease would lapse; bounded by etcd's call deadline, and harmless if etcd is gone."""
        epoch, lease = self.epoch, self.lease  # before the keeper's end clears them
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        self._deposed()
        with contextlib.suppress(EtcdUnavailable):
            if epoch:
                await self.etcd.delete_if(self.key, epoch)
            if lease:
                await self.etcd.revoke(lease)


__all__ = ["Election", "Leader"]
