"""Parameter service -> worker throughput against a raw gRPC stream of the same bytes, same run.

Both servers run in processes of their own, as deployed. shardline path: `fetch_shard`, exactly what
LoadShard runs: the manifest, then every tensor of the model streamed in 1 MiB chunks that the service
reads with pread from the store, each written into its tensor's buffer and sha256-checked. Baseline: a raw
grpc.aio server stream of 1 MiB bytes messages of the same total size, the client only counting them.

    python bench/parameters.py [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench.common import start_process, stop  # noqa: E402
from coordinator.store.importer import import_random, random_config  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shard_worker.weights import ShardSpec, fetch_shard  # noqa: E402
from shardline.server import CHANNEL_OPTIONS, bind, new_server  # noqa: E402

MODEL = "bench-params-800m"
CHUNK = int(os.environ.get("BENCH_CHUNK", 1024 * 1024))


async def serve_raw(total: int) -> None:
    payload = bytes(CHUNK)

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for sent in range(0, total, CHUNK):
            yield payload[: min(CHUNK, total - sent)]

    server = new_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream)})])
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    print(f"raw listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def raw_fetch(address: str) -> int:
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    received = sum(len(m) for m in channel.unary_stream("/bench.Raw/Stream")(b""))
    channel.close()
    return received


def main(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    if not store.has(MODEL):
        import_random(store, MODEL, random_config("llama", hidden=1024, layers=8, heads=16, intermediate=4096,
                                                  vocab=32000), seed=0)
    manifest = store.manifest(MODEL)
    total = manifest.total_size_bytes
    params, params_address = start_process(["coordinator.cli.main", "parameters", "--port", "0"],
                                           "parameter service listening on ", {"SHARDLINE_STORE": str(store_dir)})
    raw, raw_address = start_process(["bench.parameters", "--serve-raw", str(total)], "raw listening on ")
    try:
        spec = ShardSpec(MODEL, 0, manifest.num_layers, "float32", params_address)
        raw_runs, ours_runs = [], []
        for _ in range(3):  # interleaved, median of three
            began = time.perf_counter()
            assert raw_fetch(raw_address) == total
            raw_runs.append(time.perf_counter() - began)
            began = time.perf_counter()
            fetched = fetch_shard(spec, lambda p: None, chunk_bytes=CHUNK)
            ours_runs.append(time.perf_counter() - began)
            assert fetched.nbytes == total
            del fetched
    finally:
        stop([params, raw])
    raw_s, ours_s = statistics.median(raw_runs), statistics.median(ours_runs)
    mb = total / 1e6
    print("| bytes | raw grpc stream | parameter service -> worker (sha256-checked) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| {mb:.0f} MB | {mb / raw_s:.0f} MB/s | {mb / ours_s:.0f} MB/s | {raw_s / ours_s:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--serve-raw", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        asyncio.run(serve_raw(args.serve_raw))
    elif args.store:
        main(args.store)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
