"""Pipelining with synthetic stages: S = 4 real worker servers whose compute is a fixed cost per
micro-batch (a sleep of T), M = 32 micro-batches sent back to back through the real chain client, links and
servicers. Ideal throughput is M / ((M + S - 1) * T); the baseline in the same run is the same chain fed one
micro-batch at a time (no pipelining), whose ideal is 1 / (S * T).

    python bench/pipeline.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.chain import ChainClient  # noqa: E402
from shard_worker.runtime import Metrics, Step, StepResult  # noqa: E402
from shard_worker.server import start_worker  # noqa: E402
from shard_worker.servicer import _Shard  # noqa: E402
from shard_worker.weights import ShardSpec  # noqa: E402
from shardline.codec import RawTensor  # noqa: E402
from shardline.v1 import worker_pb2  # noqa: E402

S, M, T, HIDDEN = 4, 32, 0.02, 256


@dataclass
class SyntheticStage:
    start: int
    end: int
    is_first: bool
    is_last: bool


class SyntheticRuntime:
    """A stage whose compute costs exactly T per micro-batch and passes hidden states of the right size on."""

    def __init__(self, index: int) -> None:
        self.stage = SyntheticStage(index, index + 1, index == 0, index == S - 1)
        self.sessions: dict[str, object] = {}
        self.metrics = Metrics()

    def step(self, step: Step) -> StepResult:
        time.sleep(T)
        rows = sum(s.count for s in step.sequences)
        if self.stage.is_last:
            return StepResult(token_ids=[1] * len(step.sequences))
        return StepResult(tensor=RawTensor("float32", (rows, HIDDEN), bytes(rows * HIDDEN * 4)))


async def main() -> None:
    workers = [await start_worker() for _ in range(S)]
    for i, w in enumerate(workers):
        w.servicer.shard = _Shard(ShardSpec("synthetic", i, i + 1, "float32", ""), SyntheticRuntime(i), 0)  # type: ignore[arg-type]
        w.servicer.state = "ready"
    chain = ChainClient([w.address for w in workers])
    sequences = [worker_pb2.SequenceSlice(session_id=f"s{i}", start_position=0, num_tokens=8) for i in range(4)]
    ids = list(range(32))
    await chain.step(sequences, ids)  # warm up every link

    began = time.perf_counter()
    for _ in range(8):
        await chain.step(sequences, ids)
    serial = 8 / (time.perf_counter() - began)

    runs = []
    for _ in range(3):
        began = time.perf_counter()
        await asyncio.gather(*(chain.step(sequences, ids) for _ in range(M)))
        runs.append(M / (time.perf_counter() - began))
    pipelined = sorted(runs)[1]
    ideal = M / ((M + S - 1) * T)
    await chain.close()
    for w in workers:
        await w.stop(0)
    print(f"S = {S} stages, M = {M} micro-batches, T = {T * 1000:.0f} ms per micro-batch per stage")
    print("| | micro-batches/s | vs its ideal |")
    print("|---|---:|---:|")
    print(f"| one at a time (baseline, same run) | {serial:.2f} | {serial / (1 / (S * T)):.2f}x of 1/(S*T) |")
    print(f"| {M} in flight | {pipelined:.2f} | {pipelined / ideal:.2f}x of M/((M+S-1)*T) = {ideal:.2f} |")
    print(f"| speed-up from pipelining | {pipelined / serial:.2f}x | |")


if __name__ == "__main__":
    asyncio.run(main())
