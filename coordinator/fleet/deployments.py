"""A deployment as it runs: one version of a model (its spec: coordinator/config.py DeploymentSpec), its tokenizer and
its pipeline replicas (coordinator/fleet/replica.py), with a state derived from theirs."""

from __future__ import annotations

import collections
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.config import DeploymentSpec, split_name
from coordinator.fleet.states import BEST_REPLICA_FIRST, DeploymentState
from coordinator.serving.textmodel import TokenModel
from coordinator.store.models import Manifest, ModelTask
from shardline.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from coordinator.fleet.replica import Replica


@dataclass
class Deployment:
    spec: DeploymentSpec
    manifest: Manifest
    text: TokenModel
    replicas: list[Replica] = field(default_factory=list)
    unloading: bool = False
    events: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    loaded_in_s: float = 0.0  # from load request to the first replica ready (run-time loads)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # this load of it (result cache entries' owner)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def task(self) -> ModelTask:
        return self.manifest.task

    @property
    def live(self) -> list[Replica]:
        """Replicas that are, or will be, part of it (not draining away, not retired)."""
        return [r for r in self.replicas if not r.retired and not r.draining]

    @property
    def ready_replicas(self) -> list[Replica]:
        return [r for r in self.live if r.ready]

    @property
    def state(self) -> DeploymentState:
        """Derived from its replicas' states (never set): the best of them, in DeploymentState's order."""
        states = {r.state for r in self.live}
        if self.unloading:
            return DeploymentState.UNLOADING
        if not states:
            gone = not self.replicas or all(r.retired for r in self.replicas)
            return DeploymentState.SCALED_TO_ZERO if gone else DeploymentState.DRAINING
        for replica_state, state in BEST_REPLICA_FIRST:
            if replica_state in states:
                return state
        return DeploymentState.WAITING

    @property
    def message(self) -> str:
        return "; ".join(f"{r.name}: {r.message}" for r in self.live if r.message and not r.ready)

    def note(self, event: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {event}")


def resolve(requested: str, versions: dict[str, list[str]], defaults: dict[str, str], fallback: str) -> str:
    """The deployment key a request means; NotFound lists what exists. An empty name is `fallback`'s."""
    name, version = split_name(requested or fallback)
    if name not in versions:
        listing = ", ".join(f"{n} (versions {', '.join(v)})" for n, v in sorted(versions.items())) or "none"
        raise NotFound(f"model {name!r} is not served here; served: {listing}")
    if not version:
        return f"{name}@{defaults[name]}"
    if version not in versions[name]:
        raise NotFound(f"model {name!r} has no version {version!r}; its versions: {', '.join(versions[name])} "
                       f"(default {defaults[name]})")
    return f"{name}@{version}"


def check_replicas(replicas: int, pool: int, stages: int, key: str) -> None:
    """A replica count an operator asks for: 0 up to what the pool could hold."""
    if replicas < 0:
        raise InvalidArgument(f"replicas must be >= 0, got {replicas}")
    most = pool // max(1, stages)
    if replicas > most:
        raise InvalidArgument(f"{key}: {replicas} replicas of {stages} workers need {replicas * stages} workers; "
                              f"the pool has {pool} (at most {most} replicas)")
