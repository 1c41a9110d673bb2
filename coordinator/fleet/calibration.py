"""Calibrations: what each worker offers each model, measured once and kept per (worker, model, dtype).

A calibration asks the worker for the time of one layer of the model on the planned step (ShardWorker.Calibrate,
built from the model's config: no weights move), then times the link to it: the round trip of an empty echo
(the fastest of a few) and a payload of LINK_PAYLOAD_BYTES there and back (bandwidth). Calibrations run one at
a time (workers sharing a machine would disturb each other's measurement). A failure is logged and kept, with
its reason, so the plan falls back to balancing bytes and says why.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass

import grpc

from coordinator.fleet.placement import fit
from coordinator.fleet.planner import PlanDoesNotFit, StagePlan, layer_costs
from coordinator.fleet.registry import WorkerRecord
from coordinator.fleet.timed_planner import StageExplanation, WorkerSpeed, compute_weights, explain, plan_by_time
from coordinator.store.models import Manifest, ModelStore
from shardline.codec import dtype_to_enum
from shardline.errors import from_rpc_error
from shardline.fencing import control_metadata
from shardline.server import channel
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
LINK_PAYLOAD_BYTES = 2 * 2**20
RTT_PROBES = 3
RETRY_FAILED_S = 60.0  # a failed calibration is tried again after this long (and on every explicit rebalance)
MAX_CHOICES = 32  # sets of workers a rebalance plans at most (about 10 ms each for 80 layers on 4 stages)


@dataclass(frozen=True)
class StepShape:
    """The planned step a calibration times: `sequences` of `tokens` tokens over `context` cached positions."""

    sequences: int = 16
    tokens: int = 1
    context: int = 256
    max_ms: int = 10_000

    @property
    def step_tokens(self) -> int:
        return self.sequences * self.tokens


@dataclass(frozen=True)
class Calibration:
    speed: WorkerSpeed
    activation_bytes_per_token: int
    threads: int


class Calibrations:
    def __init__(self, store: ModelStore, links: LinkSettings, shape: StepShape) -> None:
        self.store, self.links, self.shape = store, links, shape
        self.known: dict[tuple[str, str, str], Calibration] = {}
        self.failed: dict[tuple[str, str, str], str] = {}
        self.failed_at: dict[tuple[str, str, str], float] = {}  # time.monotonic() of each failure
        self.serving: dict[tuple[str, str, str], str] = {}  # not calibrated: it held a shard when asked
        self._lock = asyncio.Lock()  # one calibration at a time, cluster-wide

    def get(self, worker: WorkerRecord, model: str, dtype: str) -> Calibration | None:
        return self.known.get((worker.worker_id, model, dtype))

    def why_not(self, workers: list[WorkerRecord], model: str, dtype: str) -> str:
        """Why these workers cannot be planned by time ("" when they can)."""
        for w in workers:
            key = (w.worker_id, model, dtype)
            if key in self.known:
                continue
            if key in self.failed:
                return f"calibrating worker {w.address} failed: {self.failed[key]}"
            if key in self.serving:
                return (f"worker {w.address} is not calibrated: it serves {self.serving[key]} (only workers "
                        f"holding no shard are calibrated: timing stalls a worker's steps)")
            return f"worker {w.address} is not calibrated yet"
        return ""

    def note_serving(self, worker: WorkerRecord, model: str, dtype: str, shard: str) -> None:
        """`worker` holds `shard` and is left uncalibrated for (model, dtype): its plans balance bytes, saying so."""
        key = (worker.worker_id, model, dtype)
        if key not in self.known:
            self.serving[key] = shard

    def _settled(self, key: tuple[str, str, str], retry: bool) -> bool:
        if key in self.known:
            return True
        return key in self.failed and not retry and time.monotonic() - self.failed_at.get(key, 0.0) < RETRY_FAILED_S

    async def ensure(self, workers: list[WorkerRecord], model: str, family: str, dtype: str,
                     retry: bool = False) -> None:
        """Calibrate those of `workers` not calibrated yet for (model, dtype), one at a time: a failure is
        tried again after RETRY_FAILED_S, or at once with `retry` (an explicit rebalance)."""
        for worker in workers:
            key = (worker.worker_id, model, dtype)
            if self._settled(key, retry):
                continue
            async with self._lock:
                if self._settled(key, retry):
                    continue
                self.serving.pop(key, None)
                try:
                    self.known[key] = await self._calibrate(worker.address, model, family, dtype)
                    self.failed.pop(key, None)
                    c = self.known[key]
                    log.info("calibrated worker %s for %s at %s: %.2f ms per layer (%d threads), round trip "
                             "%.2f ms, %.0f MiB/s", worker.address, model, dtype, c.speed.seconds_per_layer * 1000,
                             c.threads, c.speed.rtt_s * 1000, c.speed.bandwidth_bytes_per_s / 2**20)
                except Exception as exc:  # noqa: BLE001 - kept and logged: the plan falls back to bytes
                    self.failed[key], self.failed_at[key] = str(exc) or type(exc).__name__, time.monotonic()
                    log.warning("calibrating worker %s for %s failed (its plans balance bytes): %s",
                                worker.address, model, self.failed[key])

    async def _calibrate(self, address: str, model: str, family: str, dtype: str) -> Calibration:
        s, links = self.shape, self.links
        config_json = await asyncio.to_thread(self.store.config_json, model)
        request = worker_pb2.CalibrateRequest(family=family, config_json=config_json,
                                              dtype=dtype_to_enum(dtype),  # type: ignore[arg-type]
                                              sequences=s.sequences, tokens=s.tokens, context_tokens=s.context,
                                              max_ms=s.max_ms)
        async with channel(address, links.keepalive, links.identity) as ch:
            stub = worker_pb2_grpc.ShardWorkerStub(ch)

            async def call(req: worker_pb2.CalibrateRequest,
                           timeout: float) -> tuple[float, worker_pb2.CalibrateResponse]:
                began = time.perf_counter()
                try:
                    reply = await stub.Calibrate(req, timeout=timeout,
                                                 metadata=control_metadata(links.identity.metadata, links.epoch))
                except grpc.RpcError as err:
                    raise from_rpc_error(err) from err
                return time.perf_counter() - began, reply

            _, measured = await call(request, s.max_ms / 1000 * 2 + 30)
            rtt = min([(await call(worker_pb2.CalibrateRequest(), 10))[0] for _ in range(RTT_PROBES)])
            payload = b"\0" * LINK_PAYLOAD_BYTES
            took = min([(await call(worker_pb2.CalibrateRequest(payload=payload), 30))[0] for _ in range(2)])
        bandwidth = 2 * LINK_PAYLOAD_BYTES / (took - rtt) if took > rtt else math.inf
        return Calibration(WorkerSpeed(measured.seconds_per_layer, rtt, bandwidth),
                           measured.activation_bytes_per_token, measured.threads)


WIRE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


class TimedPlans:
    """Plans by time where every worker of a chain is calibrated for the model, by bytes otherwise (saying
    why). `dtype`: the compute dtype calibrated at; `wire`: the dtype hidden states travel in."""

    def __init__(self, calibrations: Calibrations, manifest: Manifest, model: str, dtype: str, wire: str,
                 tolerance: float = 0.1, min_gain_s: float = 0.002) -> None:
        self.calibrations, self.manifest, self.model, self.dtype = calibrations, manifest, model, dtype
        self.tolerance, self.min_gain_s = tolerance, min_gain_s
        self.wire_factor = WIRE_BYTES.get(wire or dtype, 4) / WIRE_BYTES[dtype]

    def _known(self, workers: list[WorkerRecord]) -> list[Calibration | None]:
        return [self.calibrations.get(w, self.model, self.dtype) for w in workers]

    def activation_bytes(self, known: list[Calibration | None]) -> float:
        per_token = max((c.activation_bytes_per_token for c in known if c is not None), default=0)
        return per_token * self.wire_factor * self.calibrations.shape.step_tokens

    def _by_time(self, workers: list[WorkerRecord]) -> tuple[list[StagePlan], list[StageExplanation]]:
        known = [c for c in self._known(workers) if c is not None]
        shape = self.calibrations.shape
        return plan_by_time(self.manifest, [w.address for w in workers], [c.speed for c in known],
                            [w.memory_budget_bytes for w in workers], self.activation_bytes(list(known)),
                            shape.sequences, shape.tokens)

    def fit(self, workers: list[WorkerRecord]) -> tuple[list[StagePlan], str]:
        """A split over exactly these workers (in order) and its basis, or PlanDoesNotFit. The byte-balanced
        split is kept where its predicted time is within `tolerance` (a share) or `min_gain_s` of the best
        (measurements are noisy: workers of equal speed, and small models, keep equal ranges)."""
        by_bytes = fit(self.manifest, workers)
        why = self.calibrations.why_not(workers, self.model, self.dtype)
        if why:
            return by_bytes, f"bytes ({why})"
        timed, explained = self._by_time(workers)
        best = max(s.stage_s for s in explained)
        kept = max(s.stage_s for s in self.explain(workers, by_bytes))
        if kept - best <= max(best * self.tolerance, self.min_gain_s):
            return by_bytes, (f"time (calibrated; the byte-balanced split predicts {kept * 1000:.1f} ms a step, "
                              f"within {self.tolerance:.0%} or {self.min_gain_s * 1000:.0f} ms of the best "
                              f"{best * 1000:.1f} ms: kept)")
        return timed, f"time (calibrated: {best * 1000:.1f} ms a step at the slowest stage, compute + hop out)"

    def _worst(self, workers: list[WorkerRecord]) -> float:
        try:
            return max(s.stage_s for s in self._by_time(workers)[1])
        except PlanDoesNotFit:
            return math.inf

    def choose(self, candidates: list[WorkerRecord], stages: int) -> tuple[list[WorkerRecord], str]:
        """Of the candidates (in order, the chain's own first), the `stages` whose plan predicts the smallest
        largest stage time, and a note on spares left out ("" when none). The first `stages` (the current
        set) are kept unless another set gains more than `fit`'s noise tolerance; spares that are not
        calibrated are left out (the note says why), and only the fastest spares are compared, so that at
        most MAX_CHOICES sets are planned (each a full planner run: callers run this off the event loop)."""
        current, spares = candidates[:stages], candidates[stages:]
        if not spares or self.calibrations.why_not(current, self.model, self.dtype):
            return current, ""
        notes, timed = [], []
        for w in spares:
            why = self.calibrations.why_not([w], self.model, self.dtype)
            if why:
                notes.append(why)
            else:
                timed.append(w)
        note = ("spares left out: " + "; ".join(notes)) if notes else ""
        speed = {w.worker_id: self._known([w])[0] for w in timed}
        timed.sort(key=lambda w: speed[w.worker_id].speed.seconds_per_layer)  # type: ignore[union-attr]
        k = 0
        while k < len(timed) and math.comb(stages + k + 1, stages) <= MAX_CHOICES:
            k += 1
        order = {w.worker_id: i for i, w in enumerate(candidates)}
        pool = sorted(current + timed[:k], key=lambda w: order[w.worker_id])
        kept = self._worst(current)
        best, chosen = kept, current
        for workers in itertools.combinations(pool, stages):
            if list(workers) == current:
                continue
            worst = self._worst(list(workers))
            if worst < best:
                best, chosen = worst, list(workers)
        if chosen is not current and not math.isinf(kept) and \
                kept - best <= max(best * self.tolerance, self.min_gain_s):
            return current, note  # within the noise: moving layers and replaying every stream gains nothing
        return chosen, note

    def explain(self, workers: list[WorkerRecord], stages: list[StagePlan]) -> list[StageExplanation]:
        known = self._known(workers)
        shape = self.calibrations.shape
        return explain(list(w.address for w in workers), [(s.start, s.end) for s in stages],
                       layer_costs(self.manifest), compute_weights(self.manifest, shape.sequences, shape.tokens),
                       [c.speed if c is not None else None for c in known], self.activation_bytes(known),
                       [w.memory_budget_bytes for w in workers])


def explain_unmeasured(manifest: Manifest, workers: list[WorkerRecord],
                       stages: list[StagePlan]) -> list[StageExplanation]:
    """The explanation of a plan made without calibrations (calibration is off): each stage's worker, range,
    bytes and budget; speeds unknown (0: `coordinator plan --explain` shows "-")."""
    return explain([w.address for w in workers], [(s.start, s.end) for s in stages], layer_costs(manifest),
                   compute_weights(manifest), [None] * len(workers), 0.0, [w.memory_budget_bytes for w in workers])
