"""A stage's steps on their way through the pipeline: each checked against the route the coordinator planned,
queued on the worker's compute thread, and its hidden states passed on to the next stage's worker over a
stage stream (shardline/stream.py)."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from shard_worker.lifecycle import ShardLifecycle
from shard_worker.runtime import Metrics, StageRuntime, Step, StepResult
from shardline.codec import RawTensor
from shardline.errors import FailedPrecondition, InvalidArgument
from shardline.stream import LinkSettings, StageStreams
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)


class Queued(NamedTuple):
    """A step on the compute thread: its result, what runs once it is done, and the next stage's first layer."""

    result: concurrent.futures.Future[StepResult]
    settle: Callable[[], None]
    next_layer: int


class Relay:
    """Steps into the held shard's runtime and their activations on to the next stage."""

    def __init__(self, lifecycle: ShardLifecycle, links: LinkSettings) -> None:
        self.lifecycle = lifecycle
        self.links = StageStreams(links)
        self.identity = links.identity
        # the workers of the current plan (SetPeers): a route may name only these. None = never told: a
        # worker of a cluster with an identity then refuses every route; one without (loopback development)
        # accepts any
        self.peers: frozenset[str] | None = None

    def set_peers(self, addresses: frozenset[str]) -> None:
        self.peers = addresses
        log.info("the plan's workers: %s", ", ".join(sorted(addresses)) or "none")

    def forget_peers(self) -> None:
        """No route is accepted until the coordinator names the peers again."""
        self.peers = None

    def submit(self, step: Step, start_layer: int, route: Sequence[str], size: int) -> Queued:
        """Queue one step (`size` bytes received) on the compute thread. The runtime is held only by the
        queued step, never by a stream waiting for its next message, so an UnloadShard frees it while
        streams stay open."""
        runtime = self.lifecycle.runtime()
        self._check_route(runtime, start_layer, route, step.output)
        metrics = runtime.metrics
        metrics.bytes_in += size
        metrics.queued += 1
        future = self.lifecycle.compute.submit(functools.partial(runtime.step, step))
        return Queued(future, functools.partial(_dequeued, metrics), runtime.stage.end)

    def _check_route(self, runtime: StageRuntime, start_layer: int, route: Sequence[str], output: str) -> None:
        stage = runtime.stage
        if start_layer != stage.start:
            raise InvalidArgument(f"start_layer {start_layer} does not match this worker, whose first layer "
                                  f"is {stage.start}")
        if route and stage.is_last:
            raise InvalidArgument(f"route continues to {route[0]} past the last stage")
        if not route and not stage.is_last and output != "hidden":
            raise InvalidArgument(f"route is empty but layers [{stage.end}, ...) remain: output {output!r} "
                                  "needs the route to reach the last stage")
        if route and (self.peers is not None or self.identity.configured):
            outside = [a for a in route if a not in (self.peers or ())]
            if outside:
                # FAILED_PRECONDITION: only the cluster can call Forward, so this stage's view of the plan is
                # stale (a SetPeers it missed); the coordinator heals that like a stage that lost its state
                raise FailedPrecondition(f"route names {outside[0]}, which is not a worker of the current plan "
                                         f"({len(self.peers or ())} workers named by the coordinator)")

    def pass_on(self, target: str, onward: worker_pb2.ForwardRequest, hidden: RawTensor, timeout_ms: int,
                received: float) -> Awaitable[worker_pb2.ForwardResponse]:
        """The next stage's reply to `onward`, which goes on with what is left of the step's deadline
        (`timeout_ms` from `received`; 0 = the link's default)."""
        self.count_out(len(hidden.data))
        left = timeout_ms / 1000 - (time.monotonic() - received) if timeout_ms else None
        return self.links.get(target).step(onward, hidden, None if left is None else max(0.001, left))

    def count_out(self, n: int) -> None:
        shard = self.lifecycle.shard
        if shard is not None:
            shard.runtime.metrics.bytes_out += n

    async def close(self) -> None:
        await self.links.close()


def _dequeued(metrics: Metrics) -> None:
    metrics.queued -= 1
