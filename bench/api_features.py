"""What the API features tools expect cost (issue 30): tokens/s with log probabilities (top 5) and with a JSON
schema against plain decoding, at 1 and 16 streams; and n=4 against 4 separate requests (tokens/s and time to
first token). One cluster, one run, the variants interleaved round by round (A, B, C, A, B, C, ...).

    python bench/api_features.py [--rounds 3] [--tokens 48]

The cluster: `LocalCluster` (the coordinator in this process, 3 worker processes, `launch`'s defaults) serving
the built-in SmolLM2 from the default store; the result cache off (every request is computed). Every request
is sampled (temperature 0.8, its own seed), runs max_tokens with ignore_eos (the JSON schema's string never
ends before it), and is counted by the tokens it produced.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.models import default_store  # noqa: E402
from shardline.client import AsyncClient  # noqa: E402

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 1000}}, "required": ["story"]}
VARIANTS = {"plain": {}, "logprobs=5": {"logprobs": 5}, "json_schema": {"json_schema": SCHEMA}}
PROMPT = "Write a short story about a lighthouse keeper and a storm."
LONG = " ".join(["The keeper climbed the stairs, trimmed the wick and watched the sea."] * 30)  # ~450 tokens


async def rate(client: AsyncClient, streams: int, tokens: int, params: dict, seed: int) -> float:
    """Tokens per second of `streams` requests at once."""
    began = time.perf_counter()
    results = await asyncio.gather(*(client.generate(PROMPT, max_tokens=tokens, temperature=0.8, seed=seed + i,
                                                     ignore_eos=True, **params) for i in range(streams)))
    assert all(r.completion_tokens == tokens for r in results)
    return streams * tokens / (time.perf_counter() - began)


async def choices(client: AsyncClient, tokens: int, seed: int, together: bool) -> tuple[float, float]:
    """n=4 in one request, or 4 requests with the same seeds, on a prompt of about 450 tokens (its own for each
    call: the prefix cache finds nothing): tokens/s, and the time until every choice's first token came."""
    prompt = f"Story number {seed} ({'together' if together else 'apart'}): {LONG}"
    began, firsts = time.perf_counter(), {}

    async def read(stream, index_of) -> None:
        async for chunk in stream:
            if chunk.token_ids:
                firsts.setdefault(index_of(chunk), time.perf_counter() - began)

    if together:
        await read(await client.generate(prompt, n=4, max_tokens=tokens, temperature=0.8, seed=seed, ignore_eos=True,
                                         stream=True), lambda c: c.index)
    else:
        streams = [await client.generate(prompt, max_tokens=tokens, temperature=0.8, seed=seed + i, ignore_eos=True,
                                         stream=True) for i in range(4)]
        await asyncio.gather(*(read(s, lambda c, i=i: i) for i, s in enumerate(streams)))
    return 4 * tokens / (time.perf_counter() - began), max(firsts.values())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--only", choices=("rates", "choices"), default=None)
    args = parser.parse_args()
    port = free_port()
    cluster = LocalCluster(CoordinatorConfig(store=default_store(), model="smollm2", workers=3, port=port, http=False,
                                             result_cache_mb=0))
    await cluster.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", timeout=900) as client:
            await rate(client, 2, 8, {}, 1)  # warm
            table: dict[tuple[str, int], list[float]] = {}
            for r in range(args.rounds if args.only != "choices" else 0):
                for streams in (1, 16):
                    for name, params in VARIANTS.items():
                        got = await rate(client, streams, args.tokens, params, 100 * r)
                        table.setdefault((name, streams), []).append(got)
                        print(f"round {r}: {name} x{streams}: {got:.1f} tok/s", flush=True)
            several: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for r in range(args.rounds if args.only != "rates" else 0):
                for together in (True, False):
                    several[together].append(await choices(client, args.tokens, 1000 + r, together))
    finally:
        await cluster.stop()
    if table:
        rates(table)
    if several[True]:
        choices_table(several)


def rates(table: dict[tuple[str, int], list[float]]) -> None:
    print("\n| streams | plain tok/s | logprobs=5 tok/s (ratio) | json_schema tok/s (ratio) |\n|---:|---:|---:|---:|")
    for streams in (1, 16):
        plain = statistics.median(table[("plain", streams)])
        cells = [f"{statistics.median(table[(n, streams)]):.1f} ({statistics.median(table[(n, streams)]) / plain:.2f}x)"
                 for n in ("logprobs=5", "json_schema")]
        print(f"| {streams} | {plain:.1f} | {cells[0]} | {cells[1]} |")


def choices_table(several: dict[bool, list[tuple[float, float]]]) -> None:
    one, four = ([statistics.median(x[k] for x in several[t]) for k in (0, 1)] for t in (True, False))
    print("\n| | tok/s | time to every choice's first token |\n|---|---:|---:|")
    print(f"| n=4, one request | {one[0]:.1f} ({one[0] / four[0]:.2f}x) | {one[1] * 1000:.0f} ms "
          f"({one[1] / four[1]:.2f}x) |")
    print(f"| 4 requests, seeds s..s+3 | {four[0]:.1f} | {four[1] * 1000:.0f} ms |")


if __name__ == "__main__":
    asyncio.run(main())
