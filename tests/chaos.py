"""Helpers for the failure tests: many streams at once with an action fired mid-generation, and checks
that nothing is left behind on the workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shardline.client import AsyncClient
from shardline.v1 import worker_pb2
from tests.helpers import worker_stub

CITIES = ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Delhi", "Tokyo", "Madrid", "Berlin", "Vienna", "Lagos",
          "Quito", "Seoul", "Dublin", "Athens", "Prague"]
PROMPTS = [f"The history of the city of {city} began" for city in CITIES]


async def streams(address: str, prompts: list[str], action: Callable[[], Awaitable[Any]] | None = None,
                  after_tokens: int = 3, **params: Any) -> list[list[int]]:
    """Generate every prompt at once (streaming); once every stream has `after_tokens` tokens, run `action`.
    Returns each stream's token ids; raises if any stream fails."""
    counts = [0] * len(prompts)
    async with AsyncClient(address, timeout=300) as client:
        async def one(i: int, prompt: str) -> list[int]:
            out: list[int] = []
            async for chunk in await client.generate(prompt, stream=True, **params):
                out += chunk.token_ids
                counts[i] = len(out)
            return out

        async def fire() -> None:
            if action is None:
                return
            while min(counts) < after_tokens:
                await asyncio.sleep(0.01)
            await action()

        *results, _ = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)), fire())
        return results


def on_loop(loop: Any, fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """An action for `streams` that calls `fn` on the servers' loop (a LoopThread) and waits for it."""
    async def run() -> Any:
        async def call() -> Any:
            return fn()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), loop.loop))
    return run


def worker_statuses(addresses: list[str]) -> list[Any]:
    return [worker_stub(a).GetStatus(worker_pb2.GetStatusRequest(), timeout=5) for a in addresses]


def wait_until_no_sessions(addresses: list[str], timeout: float = 15.0) -> list[Any]:
    """Poll until no worker holds a session (ending is asynchronous); returns the last statuses."""
    deadline = time.monotonic() + timeout
    statuses = worker_statuses(addresses)
    while time.monotonic() < deadline and any(s.sessions or s.kv_cache_bytes for s in statuses):
        time.sleep(0.1)
        statuses = worker_statuses(addresses)
    return statuses
