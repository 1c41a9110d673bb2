"""Fetching a shard's weights from the parameter service: only its own tensors, every byte checked against
the manifest's sha256, resumed from the last byte received when the connection drops.

This runs on a loader thread with a blocking gRPC channel; the event loop only hears about progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from shard_worker.families import FAMILIES, Family
from shard_worker.quantize import check_supported
from shardline.auth import ClusterIdentity
from shardline.chunks import decode_chunk
from shardline.codec import dtype_from_safetensors
from shardline.errors import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShardlineError,
    Unavailable,
    from_rpc_error,
)
from shardline.server import sync_channel
from shardline.v1 import parameters_pb2, parameters_pb2_grpc
from shardline.weights_digest import weights_digest

log = logging.getLogger(__name__)

# a weight transfer's deadline: this grace, plus its bytes at this rate (a service that stalls fails the load)
FETCH_GRACE_S = 30.0
MIN_FETCH_BYTES_S = 2e6
FETCH = "/" + parameters_pb2.DESCRIPTOR.services_by_name["Parameters"].full_name + "/FetchTensors"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


@dataclass(frozen=True)
class ShardSpec:
    model: str
    start: int
    end: int
    dtype: str
    parameters_address: str
    identity: ClusterIdentity = ClusterIdentity()
    quantize: str = ""  # weight-only quantization at load (shard_worker/quantize.py): "" or "int8"
    device: str = "cpu"  # where the stage runs (shard_worker/device.py): each tensor goes there as it arrives
    engine: str = "torch"  # "torch" or "deepspeed" (shard_worker/engine.py)
    digest: str = ""  # the weights expected (shardline/weights_digest.py; "" = any): other weights are refused


@dataclass(frozen=True)
class Progress:
    phase: str  # "manifest" | "fetching" | "building" | "ready"
    bytes_done: int = 0
    bytes_total: int = 0
    tensors_done: int = 0
    tensors_total: int = 0
    tensor: str = ""


@dataclass
class FetchedShard:
    family: Family
    config: Any
    tensors: dict[str, torch.Tensor]
    digest: str = ""  # the whole model's weights (shardline/weights_digest.py): what a restarted coordinator checks

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class _Receiving:
    """One tensor arriving in chunks: a buffer (allocated, uninitialised, at the first chunk, so memory
    grows with what has arrived) and a running sha256."""

    def __init__(self, entry: parameters_pb2.TensorEntry) -> None:
        self.entry = entry
        self.buffer: torch.Tensor | None = None
        self.view: memoryview | None = None
        self.hasher = hashlib.sha256()
        self.received = 0

    def add(self, offset: int, data: memoryview) -> bool:
        """Append a chunk; True once the last byte is in."""
        name = self.entry.name
        if offset != self.received or offset + len(data) > self.entry.size_bytes:
            raise DataLoss(f"tensor {name!r}: chunk at byte {offset} (+{len(data)}) does not continue the "
                           f"{self.received} bytes received of {self.entry.size_bytes}")
        if self.view is None:
            self.buffer = torch.empty(self.entry.size_bytes, dtype=torch.uint8)
            self.view = memoryview(self.buffer.numpy())  # type: ignore[arg-type]
        self.view[offset: offset + len(data)] = data
        self.hasher.update(data)
        self.received += len(data)
        return self.received == self.entry.size_bytes

    def tensor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The verified tensor in `dtype` on `device` (converted there: a GPU receives the stored bytes);
        the host buffer goes with this object, so no shard is ever held whole on the host for a GPU."""
        digest = self.hasher.hexdigest()
        if digest != self.entry.sha256:
            raise DataLoss(f"tensor {self.entry.name!r} failed its checksum: sha256 {digest[:16]}... but the "
                           f"manifest lists {self.entry.sha256[:16]}...; the shard was not loaded")
        stored = TORCH_DTYPES[dtype_from_safetensors(self.entry.dtype)]
        shape = tuple(self.entry.shape)
        if self.buffer is None:
            return torch.empty(shape, dtype=dtype, device=device)
        t = self.buffer.view(stored).view(shape).to(device)
        return t if stored == dtype or not t.is_floating_point() else t.to(dtype)


def _rpc(call: Callable[[], Any], address: str) -> Any:
    try:
        return call()
    except grpc.RpcError as err:
        exc = from_rpc_error(err)
        if isinstance(exc, Unavailable):
            raise Unavailable(f"parameter service {address} is unreachable: {exc.message}") from err
        raise exc from err


def fetch_shard(spec: ShardSpec, on_progress: Callable[[Progress], None], retries: int = 5,
                chunk_bytes: int = 0) -> FetchedShard:
    """Fetch and verify the tensors of layers [start, end) (+ embedding / head where the stage has them)."""
    channel = sync_channel(spec.parameters_address, spec.identity)
    metadata = spec.identity.metadata
    try:
        stub = parameters_pb2_grpc.ParametersStub(channel)
        fetch = channel.unary_stream(FETCH, request_serializer=parameters_pb2.FetchTensorsRequest.SerializeToString,
                                     response_deserializer=decode_chunk)
        on_progress(Progress("manifest"))
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
        except grpc.FutureTimeoutError as exc:
            raise Unavailable(f"parameter service {spec.parameters_address} is unreachable "
                              "(no connection within 10 s)") from exc
        manifest = _rpc(lambda: stub.GetManifest(parameters_pb2.GetManifestRequest(model=spec.model), timeout=30,
                                                     metadata=metadata),
                        spec.parameters_address)
        family = FAMILIES.get(manifest.family)
        if family is None:
            raise NotFound(f"model {spec.model!r} is of family {manifest.family!r}, which this worker does not run")
        check_supported(spec.quantize, family.name, family.quantizations)  # before a byte is fetched
        config = family.config_class()(**json.loads(manifest.config_json))
        if not 0 <= spec.start < spec.end <= manifest.num_layers:
            raise InvalidArgument(f"layer range [{spec.start}, {spec.end}) is outside model {spec.model!r}, "
                                  f"which has layers [0, {manifest.num_layers})")
        digest = weights_digest((t.name, t.sha256) for t in manifest.tensors)
        if spec.digest and digest != spec.digest:
            raise FailedPrecondition(f"model {spec.model!r} in the store is not the one this deployment serves (its "
                                     "weights changed since it was loaded: re-imported with --overwrite?); nothing was "
                                     "fetched. Load it again as a new deployment (coordinator load-model) to serve "
                                     "the new weights")
        entries = {t.name: t for t in manifest.tensors}
        names = family.names.stage_tensor_names(config, list(entries), spec.start, spec.end)
        missing = [n for n in names if n not in entries]
        if missing:
            raise NotFound(f"model {spec.model!r}: the manifest lacks {missing[0]!r}")
        receiving = {n: _Receiving(entries[n]) for n in names}
        total = sum(r.entry.size_bytes for r in receiving.values())
        dtype, device = TORCH_DTYPES[spec.dtype], torch.device(spec.device)
        tensors: dict[str, torch.Tensor] = {}
        done_bytes = 0
        on_progress(Progress("fetching", 0, total, 0, len(names)))
        for attempt in range(retries + 1):
            todo = [parameters_pb2.TensorRequest(name=n, offset_bytes=r.received)
                    for n, r in receiving.items() if n not in tensors]
            if not todo:
                break
            request = parameters_pb2.FetchTensorsRequest(model=spec.model, tensors=todo, chunk_size_bytes=chunk_bytes)
            # a deadline that a transfer at MIN_FETCH_BYTES_S meets: a stalled service fails the load, naming
            # itself, and frees this loader thread for the next LoadShard
            deadline_s = FETCH_GRACE_S + (total - done_bytes) / MIN_FETCH_BYTES_S
            try:
                for chunk in fetch(request, metadata=metadata, timeout=deadline_s):
                    r = receiving.get(chunk.name)
                    if r is None or chunk.name in tensors:
                        raise DataLoss(f"parameter service sent tensor {chunk.name!r}, which was not asked for")
                    done_bytes += len(chunk.data)
                    if r.add(chunk.offset_bytes, chunk.data):
                        tensors[chunk.name] = r.tensor(dtype, device)
                        del receiving[chunk.name]
                        on_progress(Progress("fetching", done_bytes, total, len(tensors), len(names), chunk.name))
            except grpc.RpcError as err:
                failure = from_rpc_error(err)
                if isinstance(failure, DeadlineExceeded):
                    raise DeadlineExceeded(f"parameter service {spec.parameters_address} sent {done_bytes} of "
                                           f"{total} bytes, then the transfer stalled or crawled: it did not end "
                                           f"within {deadline_s:.0f} s ({FETCH_GRACE_S:.0f} s, plus "
                                           f"{MIN_FETCH_BYTES_S / 1e6:.0f} MB/s at the least)") from err
                if not isinstance(failure, Unavailable) or attempt == retries:
                    if isinstance(failure, Unavailable):
                        raise Unavailable(f"parameter service {spec.parameters_address} dropped the transfer "
                                          f"{retries + 1} times: {failure.message}") from err
                    raise failure from err
                log.warning("weight transfer interrupted (%s); resuming %d tensors", failure.message, len(receiving))
                time.sleep(min(0.2 * 2**attempt, 2.0))
        if len(tensors) != len(names):
            raise DataLoss(f"the transfer ended with {len(names) - len(tensors)} tensors incomplete")
        return FetchedShard(family, config, tensors, digest)
    except ShardlineError:
        raise
    finally:
        channel.close()
