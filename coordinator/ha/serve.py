"""`coordinator serve --etcd URL`: one of several coordinators of a cluster, of which etcd elects one to lead
(coordinator/ha/election.py). Standing by, it holds the coordinator's ports and sends every caller to the leader
(coordinator/ha/standby.py). Elected, it starts as a coordinator does after a restart: workers register with it
(they are given every coordinator's address) and it adopts the shards they hold, and streams resume through
the SDK. Deposed (its lease lapsed: paused, cut off from etcd), it stops serving at once and stands by again;
workers refuse its calls from then on (shardline/fencing.py: they have registered with the new leader's epoch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.api.server import Coordinator, identity_of, start_coordinator
from coordinator.config import CoordinatorConfig, database_name, parse_endpoints
from coordinator.ha.election import Election, Leader
from coordinator.ha.etcd import Etcd, EtcdUnavailable
from coordinator.ha.fleet_state import EtcdFleetState
from coordinator.ha.standby import Standby, start_standby
from coordinator.serving.textmodel import text_model
from coordinator.store.models import ModelStore

log = logging.getLogger(__name__)
WILDCARD = {"0.0.0.0", "::", "[::]", ""}
# settings that are each machine's own: every other one must be the same on every coordinator of a cluster
HOST_LOCAL = {"host", "port", "advertise", "store", "parameters_address", "parameters_port", "jobs_dir", "etcd",
              "metrics_port", "certs_dir", "cluster_port", "cluster_token_file", "api_keys", "insecure", "http",
              "http_port", "otlp_endpoint", "log_prompts"}


def shared_settings(config: CoordinatorConfig) -> dict[str, Any]:
    """What must be the same on every coordinator of one cluster (a standby would serve otherwise)."""
    shared = {k: v for k, v in config.model_dump(mode="json").items() if k not in HOST_LOCAL}
    if config.jobs_db is not None:  # compared (and stored in etcd) without a password
        shared["jobs_db"] = database_name(config.jobs_db)
    return shared


def differences(mine: dict[str, Any], leaders: dict[str, Any]) -> list[str]:
    return [f"{k} ({json.dumps(mine.get(k))[:80]} here, {json.dumps(leaders.get(k))[:80]} on the leader)"
            for k in sorted(set(mine) | set(leaders)) if mine.get(k) != leaders.get(k)]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def fixed_ports(config: CoordinatorConfig) -> CoordinatorConfig:
    """Ports chosen once (a leader is found at the address it advertised, so port 0 is resolved at start)."""
    update: dict[str, object] = {}
    if config.port == 0:
        update["port"] = _free_port(config.host)
    if config.certs_dir is not None and config.cluster_port == 0:
        update["cluster_port"] = _free_port(config.host)
    return config.model_copy(update=update) if update else config


def me(config: CoordinatorConfig) -> Leader:
    host = config.advertise or config.host
    if host in WILDCARD:
        raise ValueError("with --etcd, give --advertise HOST: the address other coordinators send callers to")
    host = f"[{host.strip('[]')}]" if ":" in host else host
    cluster_port = config.cluster_port if config.certs_dir is not None else config.port
    return Leader(f"{host}:{config.port}", f"{host}:{cluster_port}", 0)


@dataclass
class HighlyAvailable:
    """One coordinator of several: standing by or leading, in turn, until stopped (made by `start_ha`)."""

    config: CoordinatorConfig
    etcd: Etcd
    election: Election
    say: Callable[[str], None] = log.info
    coordinator: Coordinator | None = None
    standby: Standby | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    leaderships: int = 0  # how many times this one was elected
    became_leader: asyncio.Event = field(default_factory=asyncio.Event)
    warming: asyncio.Task[None] | None = None

    async def warm_up(self) -> None:
        """While standing by: load the configured models' tokenizers (coordinator/serving/textmodel.py keeps
        them), so that taking over costs none of it (2.6 s for SmolLM2's, cold). A failure is the leader's to
        report when it loads the model: logged here only."""
        store = ModelStore(self.config.store)
        for spec in self.config.initial_deployments():
            path = store.path(spec.model) if store.has(spec.model) else None
            if path is None or not (path / "tokenizer_config.json").is_file():
                continue
            try:
                await asyncio.to_thread(text_model, path)
            except Exception as exc:  # noqa: BLE001 - logged: the model's load reports it when elected
                log.warning("standing by: %s's tokenizer could not be loaded ahead (%s)", spec.model, exc)

    async def _stand_by(self) -> None:
        election = self.election
        self.standby = await start_standby(self.config, identity_of(self.config), lambda: election.leader)

    async def run(self) -> None:
        """Stand by, lead when elected, stand by again when deposed; until `stopping`."""
        while not self.stopping.is_set():
            campaign = asyncio.ensure_future(self.election.campaign(self.stopping))
            if not await self._first(campaign):
                return
            epoch = campaign.result()
            with contextlib.suppress(EtcdUnavailable):  # the settings standbys must match: this leader's
                await self.etcd.put(f"{self.config.etcd_prefix}/settings",
                                    json.dumps(shared_settings(self.config), sort_keys=True).encode())
            if self.standby is not None:
                await self.standby.stop()
                self.standby = None
            durable = EtcdFleetState(self.etcd.endpoints, self.config.etcd_prefix, self.config.initial_deployments(),
                                     self.election.key, epoch) if self.config.durable_fleet else None
            try:
                if durable is not None:
                    await asyncio.to_thread(durable.load)  # off the loop: the lease's keeper runs meanwhile
                self.coordinator = await start_coordinator(self.config, self.say, epoch=f"etcd-{epoch}",
                                                           durable=durable)
            except Exception as exc:  # noqa: BLE001 - this machine cannot serve (a port, a file, a bug): another leads
                if durable is not None:
                    durable.close()
                log.error("elected, but cannot start serving: %s; stepping down", exc,
                          exc_info=not isinstance(exc, ValueError | OSError))
                await self.election.resign()
                await self._stand_by_again()
                await self._first(asyncio.ensure_future(asyncio.sleep(self.config.etcd_lease_s)))  # let another
                continue
            self.leaderships += 1
            self.became_leader.set()
            self.say(f"leading (epoch {epoch}): serving on {self.coordinator.address}")
            lost = asyncio.ensure_future(self.election.lost.wait())
            await self._first(lost)
            await self._stop_serving()
            if not self.stopping.is_set():
                self.say(f"deposed (epoch {epoch} ended): standing by")
                await self._stand_by_again()

    async def _stand_by_again(self) -> None:
        """The standby's ports bound again; a port still held (the coordinator's server closing) is retried each
        second until it is free or the stop."""
        while not self.stopping.is_set():
            try:
                await self._stand_by()
                return
            except OSError as exc:
                log.warning("standing by again: %s (retrying in 1 s)", exc)
                await self._first(asyncio.ensure_future(asyncio.sleep(1.0)))

    async def _first(self, task: asyncio.Future[Any]) -> bool:
        """Wait for `task` or the stop, whichever comes first; True if `task` finished (the other cancelled)."""
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        for pending in (task, stop):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, EtcdUnavailable):
                    await pending
        return task.done() and not task.cancelled()

    async def _stop_serving(self) -> None:
        coordinator, self.coordinator = self.coordinator, None
        if coordinator is not None:
            await coordinator.stop()

    async def stop(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        self.stopping.set()
        if self.warming is not None:
            self.warming.cancel()
        try:
            await self._stop_serving()
        finally:
            if self.standby is not None:
                await self.standby.stop()
                self.standby = None
            await self.election.resign()  # a standby takes over now, not when the lease would lapse
            await self.etcd.close()


async def start_ha(config: CoordinatorConfig, say: Callable[[str], None] = log.info) -> HighlyAvailable:
    """Check etcd and bind the coordinator's ports as a standby; EtcdUnavailable (naming the endpoint and the
    reason) or OSError (a port) when it cannot. `run()` then campaigns."""
    config = fixed_ports(config)
    etcd = Etcd(parse_endpoints(config.etcd))
    try:
        version = await etcd.check()
        election = Election(etcd, f"{config.etcd_prefix}/leader", me(config), config.etcd_lease_s)
        leader = await election.current()
        stored = await etcd.get(f"{config.etcd_prefix}/settings")
        if leader is not None and stored is not None:
            differ = differences(shared_settings(config), json.loads(stored.value))
            if differ:
                raise ValueError(f"this coordinator's settings differ from those of the leader at {leader.address}: "
                                 f"{'; '.join(differ)}. Give every coordinator of the cluster the same settings "
                                 "(only host, ports, store, jobs_dir, certificates and keys files are each its own)")
        ha = HighlyAvailable(config, etcd, election, say)
        await ha._stand_by()
    except BaseException:
        await etcd.close()
        raise
    ha.warming = asyncio.ensure_future(ha.warm_up())
    say(f"etcd {version} at {etcd.endpoint}; standing by as {election.me.address}")
    return ha


__all__ = ["HighlyAvailable", "fixed_ports", "me", "start_ha"]
