"""Parameters servicer. Tensor bytes are read with os.pread, one chunk at a time, straight from the
safetensors files: memory stays flat whatever the model's size (pread also keeps file pages out of this
process's RSS, which a long-lived mmap would not), and the read runs off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from coordinator.store import Manifest, ModelStore, TensorInfo
from shardline.chunks import encode_chunk
from shardline.errors import InvalidArgument, NotFound, grpc_errors
from shardline.v1 import parameters_pb2, parameters_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024


class ParametersServicer(parameters_pb2_grpc.ParametersServicer):
    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._manifests: dict[str, tuple[float, Manifest]] = {}
        self.bytes_sent = 0
        self.chunks_sent = 0
        self.tensors_sent = 0

    def _manifest(self, model: str) -> Manifest:
        if not model:
            raise InvalidArgument("model is empty")
        manifest = self.store.manifest(model)  # NotFound names the store and its models
        return manifest

    @grpc_errors
    async def ListStoredModels(self, request: Any, context: Any) -> parameters_pb2.ListStoredModelsResponse:
        return parameters_pb2.ListStoredModelsResponse(models=self.store.models())

    @grpc_errors
    async def GetManifest(self, request: Any, context: Any) -> parameters_pb2.GetManifestResponse:
        m = self._manifest(request.model)
        return parameters_pb2.GetManifestResponse(
            model=m.name, family=m.family, config_json=self.store.config_json(m.name), num_layers=m.num_layers,
            total_size_bytes=m.total_size_bytes,
            tensors=[parameters_pb2.TensorEntry(name=t.name, dtype=t.dtype, shape=t.shape, size_bytes=t.size_bytes,
                                                sha256=t.sha256, part=t.part, layer=t.layer) for t in m.tensors])

    @grpc_errors
    async def GetStats(self, request: Any, context: Any) -> parameters_pb2.GetStatsResponse:
        return parameters_pb2.GetStatsResponse(bytes_sent=self.bytes_sent, chunks_sent=self.chunks_sent,
                                               tensors_sent=self.tensors_sent)

    @staticmethod
    def _read(fd: int, info: TensorInfo, pos: int, chunk: int) -> asyncio.Future[bytes]:
        return asyncio.ensure_future(
            asyncio.to_thread(os.pread, fd, min(chunk, info.size_bytes - pos), info.offset_bytes + pos))

    @grpc_errors
    async def FetchTensors(self, request: Any, context: Any) -> AsyncIterator[bytes]:
        """Yields chunks already in wire form (see shardline.chunks; the server registers a pass-through
        serializer for this method)."""
        manifest = self._manifest(request.model)
        known = manifest.by_name()
        if request.chunk_size_bytes < 0:
            raise InvalidArgument(f"chunk_size_bytes must be >= 0, got {request.chunk_size_bytes}")
        chunk = min(request.chunk_size_bytes or DEFAULT_CHUNK, MAX_CHUNK)
        wanted: list[tuple[TensorInfo, int]] = []
        for i, ref in enumerate(request.tensors):
            info = known.get(ref.name)
            if info is None:
                raise NotFound(f"tensors[{i}]: tensor {ref.name!r} is not in model {manifest.name!r}")
            if not 0 <= ref.offset_bytes <= info.size_bytes:
                raise InvalidArgument(f"tensors[{i}].offset_bytes {ref.offset_bytes} is outside tensor "
                                      f"{ref.name!r} of {info.size_bytes} bytes")
            wanted.append((info, ref.offset_bytes))
        root = self.store.path(manifest.name)
        fds: dict[str, int] = {}
        try:
            for info, offset in wanted:
                if info.file not in fds:
                    fds[info.file] = os.open(root / info.file, os.O_RDONLY)
                fd = fds[info.file]
                starts = list(range(offset, info.size_bytes, chunk)) if info.size_bytes else [0]
                for i, pos in enumerate(starts):
                    # one read ahead: the next chunk comes off the disk while this one goes out
                    if i == 0:
                        pending = self._read(fd, info, pos, chunk)
                    data = await pending
                    if i + 1 < len(starts):
                        pending = self._read(fd, info, starts[i + 1], chunk)
                    if len(data) != min(chunk, info.size_bytes - pos):
                        raise NotFound(f"tensor {info.name!r}: {info.file} is shorter than the manifest says")
                    yield encode_chunk(info.name, pos, info.size_bytes, data)
                    self.bytes_sent += len(data)
                    self.chunks_sent += 1
                self.tensors_sent += 1
        finally:
            for fd in fds.values():
                os.close(fd)
