"""Shared by the benchmarks: processes on loopback and timing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_process(args: list[str], prefix: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start `python -m ARGS` and wait for its 'PREFIX HOST:PORT' line; returns the process and address."""
    process = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, **(env or {})})
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return process, line.strip().removeprefix(prefix)
    process.kill()
    raise RuntimeError(f"{args} did not start")


def peak_rss(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def stop(processes: list[subprocess.Popen[str]]) -> None:
    for p in processes:
        p.terminate()
    for p in processes:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a live process (threads it starts later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, every thread (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str, *names: str) -> dict[str, float]:
    """Sum of each named Prometheus series (a name's prefix, e.g. 'shardline:stage_busy_seconds') at `url`."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        for name in names:
            if line.startswith(name):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


class Baseline:
    """A whole model in a process of its own (bench/baseline.py), optionally pinned and with set threads."""

    def __init__(self, model_dir: Path | str, kind: str = "causal", threads: int = 0, cpus: str = "",
                 env: dict[str, str] | None = None) -> None:
        args = [sys.executable, "-m", "bench.baseline", "--model", str(model_dir), "--kind", kind,
                "--threads", str(threads), "--cpus", cpus]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                        env={**os.environ, **(env or {})})
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("baseline ready"):
            self.close()
            raise RuntimeError(f"the baseline process did not start (it said {line!r})")

    def send(self, op: str, **fields: object) -> None:
        import json

        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, float]:
        import json

        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the baseline process exited")
        reply: dict[str, float] = json.loads(line)
        return reply

    def call(self, op: str, **fields: object) -> dict[str, float]:
        self.send(op, **fields)
        return self.receive()

    def close(self) -> None:
        stop([self.process])  # type: ignore[list-item]


def result(bench: str, case: str, baseline: str, ours: str, ratio: str, target: str = "") -> None:
    """One row of `make bench`'s summary table (bench/all.py collects the RESULT lines every benchmark prints)."""
    import json

    print("RESULT " + json.dumps([bench, case, baseline, ours, ratio, target]), flush=True)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


async def generate_exactly(endpoint: str, prompts: list[str], new: int) -> tuple[float, int]:
    """`prompts` as concurrent greedy requests through the SDK, each run to exactly `new` tokens (`ignore_eos`;
    checked: a short one would make a comparison meaningless); seconds and tokens."""
    import asyncio

    from shardline.client import AsyncClient

    async with AsyncClient(endpoint, timeout=600) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(client.generate(p, max_tokens=new, temperature=0, ignore_eos=True)
                                         for p in prompts))
        seconds = time.perf_counter() - began
    tokens = [r.completion_tokens for r in results]
    if tokens != [new] * len(prompts):
        raise RuntimeError(f"shardline produced {tokens} tokens, not {new} each: the comparison is void")
    return seconds, sum(tokens)


async def first_token_seconds(endpoint: str, prompt: str | list[int]) -> float:
    """Seconds from sending a streamed greedy request to its first token (text or token ids)."""
    from shardline.client import AsyncClient

    async with AsyncClient(endpoint, timeout=600) as client:
        began = time.perf_counter()
        async for chunk in await client.generate(prompt, max_tokens=2, temperature=0, ignore_eos=True, stream=True):
            if chunk.token_ids:
                return time.perf_counter() - began
    raise RuntimeError("no token")


def long_prompts(count: int, length: int = 512, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `length` random token ids that share no prefix (a prefix cache must not answer a
    time-to-first-token run from an earlier one)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(count)]
