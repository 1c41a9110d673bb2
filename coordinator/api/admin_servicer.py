"""The admin API's model management (LoadModel, UnloadModel, ScaleModel, PromoteModel) and the status of
deployments: protobuf <-> the fleet, with every field checked first."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from coordinator.config import NAME_PATTERN, DeploymentSpec, split_name
from coordinator.fleet.timed_planner import StageExplanation
from shardline.errors import InvalidArgument, grpc_errors
from shardline.v1 import coordinator_pb2

if TYPE_CHECKING:
    from coordinator.fleet.deployments import Deployment
    from coordinator.fleet.fleet import Fleet

MAX_GRACE_MS = 3_600_000


def _check_name(value: str, what: str, empty_ok: bool = False) -> None:
    if not value and empty_ok:
        return
    if not re.match(NAME_PATTERN, value):
        raise InvalidArgument(f"{what} {value[:64]!r} is not a name: 1-128 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")


def check_model_ref(model: str) -> str:
    """NAME or NAME@VERSION, each part a name."""
    if not model:
        raise InvalidArgument("model is empty: give NAME or NAME@VERSION")
    name, version = split_name(model)
    _check_name(name, "model name")
    _check_name(version, "version", empty_ok="@" not in model)
    return model


def spec_from_proto(r: coordinator_pb2.LoadModelRequest) -> DeploymentSpec:
    _check_name(r.name, "name")
    _check_name(r.version, "version", empty_ok=True)
    _check_name(r.source, "source", empty_ok=True)
    for field in ("replicas", "workers", "min_replicas", "max_replicas", "scale_up_after_ms", "scale_down_after_ms"):
        if getattr(r, field) < 0:
            raise InvalidArgument(f"{field} must be >= 0, got {getattr(r, field)}")
    if r.target_queue < 0:
        raise InvalidArgument(f"target_queue must be >= 0, got {r.target_queue}")
    fields: dict[str, Any] = dict(name=r.name, source=r.source, replicas=r.replicas or 1, workers=r.workers)
    if r.version:
        fields["version"] = r.version
    if r.max_replicas:
        fields.update(min_replicas=r.min_replicas or 1, max_replicas=r.max_replicas)
        if r.target_queue:
            fields["target_queue"] = r.target_queue
        if r.scale_up_after_ms:
            fields["scale_up_after_s"] = r.scale_up_after_ms / 1000
        if r.scale_down_after_ms:
            fields["scale_down_after_s"] = r.scale_down_after_ms / 1000
    try:
        return DeploymentSpec(**fields)
    except ValueError as exc:
        raise InvalidArgument(str(exc).splitlines()[-1] if "\n" in str(exc) else str(exc)) from None


def plan_stage(fleet: Fleet, s: StageExplanation) -> coordinator_pb2.PlanStage:
    """A stage of a replica's plan and why; the worker's link and threads as calibrated."""
    out = coordinator_pb2.PlanStage(worker=s.worker, start_layer=s.start, end_layer=s.end,
                                    seconds_per_layer=s.seconds_per_layer, compute_s=s.compute_s, hop_s=s.hop_s,
                                    weight_bytes=s.weight_bytes, memory_budget_bytes=s.budget_bytes)
    calibrations = fleet.shared.calibrations
    record = next((w for w in fleet.registry.workers.values() if w.address == s.worker), None)
    if calibrations is not None and record is not None:
        known = [c for (wid, _, _), c in calibrations.known.items() if wid == record.worker_id]
        if known:
            speed = known[-1].speed
            out.rtt_s, out.threads = speed.rtt_s, known[-1].threads
            out.bandwidth_bytes_per_s = speed.bandwidth_bytes_per_s if speed.bandwidth_bytes_per_s < 1e300 else 0
    return out


def deployment_info(fleet: Fleet, d: Deployment) -> coordinator_pb2.DeploymentInfo:
    spec = d.spec
    replicas = [coordinator_pb2.ReplicaInfo(
        name=r.name, state=r.state, message=r.message, workers=[w.address for w in r.assignment],
        running=r.running, queued=r.queued, outstanding_tokens=r.outstanding, requests=r.served,
        recoveries=r.recoveries, draining=r.draining, plan=[plan_stage(fleet, s) for s in r.plan],
        plan_basis=r.plan_basis) for r in d.replicas if not r.retired]
    return coordinator_pb2.DeploymentInfo(
        name=spec.name, version=spec.version, source=spec.model,
        is_default=fleet.defaults.get(spec.name) == spec.version, state=d.state, replicas=replicas,
        min_replicas=spec.min_replicas if spec.autoscaled else 0, max_replicas=spec.max_replicas,
        target_queue=spec.target_queue if spec.autoscaled else 0, events=list(d.events))


class AdminMethods:
    """Mixed into the Coordinator servicer (which has `fleet`)."""

    fleet: Fleet

    @grpc_errors
    async def LoadModel(self, request: Any, context: Any) -> coordinator_pb2.LoadModelResponse:
        spec = spec_from_proto(request)
        remaining = context.time_remaining() if context is not None else None
        timeout = min(self.fleet.config.load_timeout_s, remaining) if remaining else self.fleet.config.load_timeout_s
        deployment = await self.fleet.admin.load(spec, request.promote, timeout)
        promoted = " and promoted to default" if request.promote else ""
        return coordinator_pb2.LoadModelResponse(
            model=deployment.key, load_ms=int(deployment.loaded_in_s * 1000),
            message=f"{deployment.key} serves on {len(deployment.ready_replicas)} replica(s){promoted} after "
                    f"{deployment.loaded_in_s:.2f} s")

    @grpc_errors
    async def UnloadModel(self, request: Any, context: Any) -> coordinator_pb2.UnloadModelResponse:
        check_model_ref(request.model)
        if not 0 <= request.grace_ms <= MAX_GRACE_MS:
            raise InvalidArgument(f"grace_ms must be 0 .. {MAX_GRACE_MS}, got {request.grace_ms}")
        grace = request.grace_ms / 1000 if request.HasField("grace_ms") else self.fleet.config.unload_grace_s
        message, freed = await self.fleet.admin.unload(request.model, grace)
        return coordinator_pb2.UnloadModelResponse(message=message, freed_weight_bytes=freed)

    @grpc_errors
    async def ScaleModel(self, request: Any, context: Any) -> coordinator_pb2.ScaleModelResponse:
        check_model_ref(request.model)
        if not 0 <= request.grace_ms <= MAX_GRACE_MS:
            raise InvalidArgument(f"grace_ms must be 0 .. {MAX_GRACE_MS}, got {request.grace_ms}")
        grace = request.grace_ms / 1000 if request.HasField("grace_ms") else None
        return coordinator_pb2.ScaleModelResponse(
            message=await self.fleet.admin.scale(request.model, request.replicas, grace_s=grace))

    @grpc_errors
    async def PromoteModel(self, request: Any, context: Any) -> coordinator_pb2.PromoteModelResponse:
        check_model_ref(request.model)
        if "@" not in request.model:
            raise InvalidArgument(f"model {request.model[:64]!r} names no version: give NAME@VERSION")
        previous = self.fleet.admin.promote(request.model)
        return coordinator_pb2.PromoteModelResponse(
            previous_version=previous, message=f"{request.model} is the default (was version {previous})")
