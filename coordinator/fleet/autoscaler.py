"""Autoscaling (per deployment, when `max_replicas` > 0): a replica is added when the queue per serving
replica stays above `target_queue` for `scale_up_after_s`, and removed (drained first) when the deployment
stays idle for `scale_down_after_s`, within `min_replicas` .. `max_replicas`. The decision is a pure
function of what the fleet shows; every decision is logged with its reason and kept in the deployment's
events (`coordinator status`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from coordinator.config import DeploymentSpec
from coordinator.fleet.deployments import Deployment

log = logging.getLogger(__name__)


@dataclass
class Pressure:
    """Since when the queue has been long, or the deployment idle (None: it is not)."""

    high_since: float | None = None
    idle_since: float | None = None
    quiet_until: float = 0.0  # no decision before this (a cooldown after scaling, a backoff after a failure)


def decide(spec: DeploymentSpec, live: int, serving: int, queued: int, running: int, now: float,
           pressure: Pressure) -> tuple[int, str] | None:
    """The replica count to move to and why, or None. Decides only while every live replica serves (a
    deployment that is still placing or healing is left alone)."""
    if now < pressure.quiet_until:
        return None
    if live < spec.min_replicas:
        return spec.min_replicas, f"{live} replicas is below min_replicas {spec.min_replicas}"
    if serving == 0 or serving < live:
        pressure.high_since = pressure.idle_since = None
        return None
    per_replica = queued / serving
    if per_replica > spec.target_queue:
        pressure.high_since = pressure.high_since if pressure.high_since is not None else now
        if now - pressure.high_since >= spec.scale_up_after_s and live < spec.max_replicas:
            pressure.high_since = None
            return live + 1, (f"{queued} streams queued over {serving} replicas stayed above the target of "
                              f"{spec.target_queue:g} per replica for {spec.scale_up_after_s:g} s")
    else:
        pressure.high_since = None
    if queued == 0 and running == 0:
        pressure.idle_since = pressure.idle_since if pressure.idle_since is not None else now
        if now - pressure.idle_since >= spec.scale_down_after_s and live > spec.min_replicas:
            pressure.idle_since = None
            return live - 1, f"idle for {spec.scale_down_after_s:g} s"
    else:
        pressure.idle_since = None
    return None


class Scaler(Protocol):
    async def scale(self, requested: str, replicas: int, reason: str = "", *, autoscaler: bool = False) -> str: ...


class Scaled(Protocol):
    """What the autoscaler sees of the fleet (coordinator/fleet/fleet.py Fleet), and the one call it makes."""

    @property
    def deployments(self) -> Mapping[str, Deployment]: ...
    @property
    def draining(self) -> bool: ...
    @property
    def admin(self) -> Scaler: ...


async def autoscale(fleet: Scaled, interval_s: float = 0.25) -> None:
    """Supervised: one look per interval at every autoscaled deployment; a failed look is logged."""
    pressures: dict[str, Pressure] = {}
    scaling: dict[str, asyncio.Task[None]] = {}
    while True:
        await asyncio.sleep(interval_s)
        try:
            for deployment in list(fleet.deployments.values()):
                key = deployment.key
                if not deployment.spec.autoscaled or deployment.unloading or fleet.draining:
                    continue
                if key in scaling and not scaling[key].done():
                    continue
                pressure = pressures.setdefault(key, Pressure())
                decision = _look(deployment, pressure)
                if decision is not None:
                    scaling[key] = asyncio.create_task(_scale(fleet, deployment, pressure, *decision))
            for key in [k for k in pressures if k not in fleet.deployments]:  # unloaded: forget its past
                pressures.pop(key)
                scaling.pop(key, None)
        except Exception:  # noqa: BLE001
            log.exception("the autoscaler failed once; it goes on")


def _look(deployment: Deployment, pressure: Pressure) -> tuple[int, str] | None:
    live = deployment.live
    serving = deployment.ready_replicas
    return decide(deployment.spec, len(live), len(serving), sum(r.queued for r in live),
                  sum(r.running for r in live), time.monotonic(), pressure)


BACKOFF_S = 10.0


async def _scale(fleet: Scaled, deployment: Deployment, pressure: Pressure, replicas: int, reason: str) -> None:
    """One decision carried out; a failure is noted and backs off, and nothing escapes the task."""
    log.info("autoscaler: %s -> %d replicas: %s", deployment.key, replicas, reason)
    try:
        await fleet.admin.scale(deployment.key, replicas, f"autoscaler: {reason}", autoscaler=True)
        # a cooldown: the new replica takes queued work first, and is judged on what follows
        pressure.quiet_until = time.monotonic() + deployment.spec.scale_up_after_s
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - noted, logged, retried after the backoff
        pressure.quiet_until = time.monotonic() + BACKOFF_S
        deployment.note(f"autoscaler could not scale to {replicas} replicas ({reason}): {exc}")
        log.warning("autoscaler: %s cannot scale to %d replicas: %s", deployment.key, replicas, exc)
