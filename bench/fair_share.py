"""Fair share between API keys (issue 28.2): key A keeps 64 long streams going while key B sends one short
request at a time; B's time to first token against B's alone, with `fair_share` on and off (the same cluster
settings, keys, requests and processes otherwise; one cluster after the other, in this run).

    python bench/fair_share.py [--flood 64] [--prompt 512] [--rounds 8]

The cluster: `LocalCluster` (the coordinator in this process, 2 worker processes) serving a random Llama
(hidden 256, 8 layers), API keys file with keys "a" and "b" (role client). B's requests: 32 prompt ids, 1 new
token, streamed; their time to first token is read at the first chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.importer import import_random, random_config  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline.auth import hash_key, new_api_key  # noqa: E402
from shardline.client import AsyncClient  # noqa: E402

MODEL = "fair-llama"


async def ttft(client: AsyncClient, prompt: list[int]) -> float:
    began = time.perf_counter()
    stream = await client.generate(prompt, max_tokens=1, temperature=0, ignore_eos=True, stream=True)
    async for _ in stream:
        return time.perf_counter() - began
    raise RuntimeError("no chunk")


async def one_cluster(store: Path, keys_file: Path, keys: dict[str, str], fair: bool, flood: int, prompt: int,
                      rounds: int) -> tuple[float, float]:
    port = free_port()
    config = CoordinatorConfig(store=store, model=MODEL, workers=2, port=port, http=False, api_keys=keys_file,
                               fair_share=fair, max_queued_streams=4 * flood, result_cache_mb=0)
    cluster = LocalCluster(config)
    await cluster.start()
    endpoint = f"127.0.0.1:{port}"
    try:
        async with AsyncClient(endpoint, timeout=600, api_key=keys["a"]) as a, \
                AsyncClient(endpoint, timeout=600, api_key=keys["b"]) as b:
            quiet = [[(7 * r + j) % 900 + 10 for j in range(32)] for r in range(rounds)]
            await ttft(b, quiet[0])  # warm
            idle = [await ttft(b, p) for p in quiet]
            stop = asyncio.Event()

            async def busy(i: int) -> None:
                k = 0
                while not stop.is_set():
                    ids = [(13 * i + 5 * k + j) % 900 + 10 for j in range(prompt)]
                    await a.generate(ids, max_tokens=64, temperature=0, ignore_eos=True)
                    k += 1

            senders = [asyncio.create_task(busy(i)) for i in range(flood)]
            await asyncio.sleep(3.0)  # the flood is queued and running
            loaded = [await ttft(b, p) for p in quiet]
            stop.set()
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
        return statistics.median(idle), statistics.median(loaded)
    finally:
        await cluster.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flood", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "store")
        import_random(store, MODEL, random_config("llama", hidden=256, layers=8, vocab=1024, positions=2048))
        keys = {"a": new_api_key(), "b": new_api_key()}
        keys_file = Path(tmp) / "keys.json"
        keys_file.write_text(json.dumps({"keys": [{"name": n, "role": "client", "sha256": hash_key(k)}
                                                  for n, k in keys.items()]}))
        rows = []
        for fair in (False, True):
            idle, loaded = await one_cluster(store.root, keys_file, keys, fair, args.flood, args.prompt, args.rounds)
            rows.append((fair, idle, loaded))
            print(f"fair_share={fair}: B's time to first token alone {idle * 1000:.0f} ms, beside A's {args.flood} "
                  f"streams {loaded * 1000:.0f} ms ({loaded / idle:.2f}x)", flush=True)
    print("\n| fair_share | B alone (median TTFT) | B beside A's flood | ratio |\n|---|---:|---:|---:|")
    for fair, idle, loaded in rows:
        print(f"| {'on' if fair else 'off'} | {idle * 1000:.0f} ms | {loaded * 1000:.0f} ms | {loaded / idle:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
