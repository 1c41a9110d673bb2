"""Parameters servicer. Tensor bytes are read with os.pread straight from the safetensors files, READ_BYTES
at a time (one read ahead) and sent in chunks that are views of that read: memory stays flat whatever the
model's size (pread also keeps file pages out of this process's RSS, which a long-lived mmap would not). A
large read runs off the event loop, one thread hop per READ_BYTES rather than per chunk; a small one (a norm's
weights) is read in place, as a thread hop would cost more than the read.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from coordinator.store.models import Manifest, ModelStore, TensorInfo
from shardline.chunks import encode_chunk
from shardline.errors import FailedPrecondition, InvalidArgument, NotFound, grpc_errors
from shardline.v1 import parameters_pb2, parameters_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
READ_BYTES = 8 * 1024 * 1024  # per pread (a multiple of the chunk size): two in memory at most
INLINE_READ_BYTES = 64 * 1024  # reads up to this size run on the event loop


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
    def _read(fd: int, info: TensorInfo, pos: int, size: int) -> asyncio.Future[bytes]:
        size = min(size, info.size_bytes - pos)
        if size <= INLINE_READ_BYTES:
            done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            done.set_result(os.pread(fd, size, info.offset_bytes + pos))
            return done
        return asyncio.ensure_future(asyncio.to_thread(os.pread, fd, size, info.offset_bytes + pos))

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
        for info, _ in wanted:  # a manifest copied from elsewhere must never name a file outside its model
            if not (root / info.file).resolve().is_relative_to(root.resolve()):
                raise FailedPrecondition(f"model {manifest.name!r}: tensor {info.name!r} names the file "
                                         f"{info.file!r}, outside the model's directory: the manifest is refused")
        fds: dict[str, int] = {}
        try:
            for info, offset in wanted:
                if info.file not in fds:
                    fds[info.file] = os.open(root / info.file, os.O_RDONLY)
                fd = fds[info.file]
                step = max(chunk, READ_BYTES // chunk * chunk)
                starts = list(range(offset, info.size_bytes, step)) if info.size_bytes else [0]
                for i, start in enumerate(starts):
                    # one read ahead: the next read comes off the disk while this one goes out
                    if i == 0:
                        pending = self._read(fd, info, start, step)
                    block = await pending
                    if i + 1 < len(starts):
                        pending = self._read(fd, info, starts[i + 1], step)
                    if len(block) != min(step, info.size_bytes - start):
                        raise NotFound(f"tensor {info.name!r}: {info.file} is shorter than the manifest says")
                    view = memoryview(block)
                    for at in range(0, len(block), chunk) if block else [0]:
                        data = view[at: at + chunk]
                        yield encode_chunk(info.name, start + at, info.size_bytes, data)
                        self.bytes_sent += len(data)
                        self.chunks_sent += 1
                self.tensors_sent += 1
        finally:
            for fd in fds.values():
                os.close(fd)
