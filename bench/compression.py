"""Compressed activations over a slow link: tokens/s of 16 greedy streams on SmolLM2 split over two workers,
the link between them capped by a bandwidth-limiting proxy (tests/faults.py FaultProxy.rate_bytes_s), with
hidden states sent in bfloat16 (and int8 + row scales) against float32, measured in the same run.

Each stream prefills a 128-token slice of the shipped text, then decodes 32 tokens; the 16 streams step
together, one step in flight (the chain's latency is what the link adds to). Every variant produces the same
number of tokens (checked). The variants alternate, and each one's best of `--repeats` runs is kept.

    python bench/compression.py [--rate-mb-s 100] [--rate-mb-s 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from coordinator.store.parameters.server import start_parameter_server  # noqa: E402
from shard_worker.accuracy import TEXT, load_chain  # noqa: E402
from shard_worker.server import start_worker  # noqa: E402
from tests.faults import FaultProxy  # noqa: E402

STREAMS, PROMPT_TOKENS, NEW_TOKENS = 16, 128, 32
LAYERS = [(0, 15), (15, 30)]


async def run_streams(chain, prompts: list[list[int]], tag: str) -> tuple[float, int]:
    """(seconds, tokens produced) for every prompt prefilled together, then NEW_TOKENS - 1 decode steps."""
    began = time.perf_counter()
    out = await chain.greedy(prompts, NEW_TOKENS, tag)
    return time.perf_counter() - began, sum(len(o) for o in out)


async def main(rates_mb_s: list[float], repeats: int) -> None:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp))
        import_gguf(store, builtin_gguf(), "smollm2")
        tokenizer = AutoTokenizer.from_pretrained(store.path("smollm2"))
        text = tokenizer(TEXT.read_text())["input_ids"]
        prompts = [text[(i * 29) % (len(text) - PROMPT_TOKENS):][:PROMPT_TOKENS] for i in range(STREAMS)]
        parameters = await start_parameter_server(store)
        servers = [await start_worker() for _ in range(2)]
        proxy = await FaultProxy.start(servers[1].address)
        await (await load_chain([servers[1].address], "smollm2", parameters.address, LAYERS[1:])).close()
        try:
            print(f"SmolLM2-135M fp32, 2 stages, {STREAMS} streams x ({PROMPT_TOKENS} prompt + {NEW_TOKENS} new "
                  "tokens), greedy; link stage 0 -> stage 1 through a capped proxy")
            print(f"{'cap MB/s':>9} {'wire':>9} {'tok/s':>8} {'hop MB/run':>11} {'vs float32':>10}")
            for rate in rates_mb_s:
                proxy.rate_bytes_s = rate * 1e6
                best: dict[str, tuple[float, int, float]] = {}
                for rep in range(repeats):
                    for wire in ("float32", "bfloat16", "int8"):
                        # the wire dtype is the sender's (stage 0): only it is loaded again
                        chain = await load_chain([servers[0].address], "smollm2", parameters.address, LAYERS[:1],
                                                 wire_dtype=wire)
                        chain.addresses = [servers[0].address, proxy.address]  # the route goes through the cap
                        try:
                            sent = servers[0].servicer.shard.runtime.metrics  # type: ignore[union-attr]
                            seconds, tokens = await run_streams(chain, prompts, f"{wire}-{rate}-{rep}")
                            hop_mb = sent.bytes_out / 1e6
                        finally:
                            await chain.close()
                        if tokens != STREAMS * NEW_TOKENS:
                            raise SystemExit(f"{wire}: {tokens} tokens, expected {STREAMS * NEW_TOKENS}")
                        if wire not in best or seconds < best[wire][0]:
                            best[wire] = (seconds, tokens, hop_mb)
                base = best["float32"][1] / best["float32"][0]
                for wire, (seconds, tokens, hop_mb) in best.items():
                    rate_tok = tokens / seconds
                    print(f"{rate:>9g} {wire:>9} {rate_tok:>8.1f} {hop_mb:>11.2f} {rate_tok / base:>9.2f}x")
            print(f"(connections through the capped proxy: {proxy.connections})")
        finally:
            await proxy.close()
            for s in servers:
                await s.stop(0)
            await parameters.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate-mb-s", type=float, action="append", help="link caps to measure (repeatable)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.rate_mb_s or [100.0], args.repeats))
