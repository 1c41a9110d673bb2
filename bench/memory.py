"""Memory while loading a large model: a random Llama of >= 1.5 GB split over 4 worker processes.

Each worker's peak RSS must stay below its shard's bytes x 1.2 + 500 MB + the activation headroom it
measures after loading (one step of max_step_tokens, run once to size its KV cache; GetStatus reports it),
and the parameter service's (its own process) below 500 MB: weights stream through, they are never
gathered.

    python bench/memory.py [--store DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import peak_rss, start_process, stop  # noqa: E402
from coordinator.fleet.planner import plan  # noqa: E402
from coordinator.store.importer import import_random, random_config  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402

MB = 1024 * 1024
MODEL = "mem-llama-1.7g"
DIMS = dict(hidden=2048, layers=8, heads=16, kv_heads=16, intermediate=5632, vocab=8192)


@dataclass
class Row:
    role: str
    layers: str
    shard_bytes: int
    peak_rss: int
    limit: int

    @property
    def ok(self) -> bool:
        return self.peak_rss < self.limit


def measure(store_dir: Path, workers: int = 4) -> list[Row]:
    from shardline.v1 import worker_pb2
    from tests.helpers import load, worker_stub  # the same LoadShard call the launcher makes

    store = ModelStore(store_dir)
    if not store.has(MODEL):
        import_random(store, MODEL, random_config("llama", **DIMS), seed=0)
    manifest = store.manifest(MODEL)
    if manifest.total_size_bytes < 1.5e9:
        raise RuntimeError("the model must be at least 1.5 GB")
    env = {"SHARDLINE_STORE": str(store_dir)}
    processes = []
    try:
        params, params_address = start_process(["coordinator.cli.main", "parameters", "--port", "0"],
                                               "parameter service listening on ", env)
        processes.append(params)
        started = [start_process(["shard_worker.cli", "serve", "--port", "0", "--log-level", "WARNING"],
                                 "shard worker listening on ") for _ in range(workers)]
        processes += [p for p, _ in started]
        stages = plan(manifest, workers)
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda ws: load(ws[0][1], MODEL, ws[1].start, ws[1].end, params_address),
                          zip(started, stages, strict=True)))
        headroom = [worker_stub(address).GetStatus(worker_pb2.GetStatusRequest(), timeout=10).kv.headroom_bytes
                    for _, address in started]
        rows = [Row(f"worker {i}", f"[{s.start}, {s.end})", s.weight_bytes, peak_rss(p.pid),
                    int(s.weight_bytes * 1.2 + 500 * MB + h))
                for i, ((p, _), s, h) in enumerate(zip(started, stages, headroom, strict=True))]
        rows.append(Row("parameter service", "all", manifest.total_size_bytes, peak_rss(params.pid), 500 * MB))
        return rows
    finally:
        stop(processes)


def report(rows: list[Row]) -> str:
    lines = [f"| {'role':<18} | {'layers':<8} | {'shard MiB':>9} | {'peak RSS MiB':>12} | {'limit MiB':>9} | ok |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.role:<18} | {r.layers:<8} | {r.shard_bytes / MB:>9.0f} | {r.peak_rss / MB:>12.0f} | "
                     f"{r.limit / MB:>9.0f} | {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.store or Path(tmp))
    print(report(result))
    sys.exit(0 if all(r.ok for r in result) else 1)
