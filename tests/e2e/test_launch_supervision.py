"""`coordinator launch` as an operator meets it: a worker process that dies is restarted and the cluster
serves again; SIGTERM drains (the streams in flight finish, a new request is refused with UNAVAILABLE),
then every process exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from shardline.client import AsyncClient, Client
from shardline.errors import Unavailable
from tests.chaos import PROMPTS
from tests.e2e.test_join_and_generate import free_port
from tests.launched import admin_key

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]


def launch(store, port: int) -> tuple[subprocess.Popen, list[str]]:
    env = {**os.environ, "SHARDLINE_STORE": str(store)}
    launcher = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", "--model", "smollm2",
                                 "--workers", "2", "--port", str(port), "--drain-seconds", "60"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in launcher.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return launcher, lines


def wait_for(condition, timeout: float, what: str, lines: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s; launch said:\n{''.join(lines)}")
        time.sleep(0.2)


def test_launch_restarts_a_dead_worker_then_sigterm_drains_the_streams_in_flight(smollm2_store):
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    launcher, lines = launch(smollm2_store.root, port)
    try:
        wait_for(lambda: any("serving; Ctrl-C" in line for line in lines), 180, "launch was not ready", lines)
        workers = psutil.Process(launcher.pid).children()
        assert len(workers) == 2
        victim = workers[0]
        victim.kill()
        victim.wait(10)
        with Client(endpoint, timeout=60, api_key=admin_key("".join(lines))) as client:
            def serving_two_again() -> bool:
                status = client.cluster_status()
                chain = [w for w in status.workers if w.state == "ready"]
                return status.state == "ready" and len(chain) == 2 and status.recoveries >= 1

            wait_for(serving_two_again, 120, "the cluster was not serving on 2 workers again", lines)
            client.wait_ready(timeout=30)
            now = psutil.Process(launcher.pid).children()
            assert len(now) == 2 and victim.pid not in [p.pid for p in now]
            text = "".join(lines)
            assert "restarting it" in text and "recovered in" in text, text
            assert client.generate("The capital of France is", max_tokens=4, temperature=0).completion_tokens == 4

        async def drain(signal_it: bool) -> tuple[list, str]:
            async with AsyncClient(endpoint, timeout=300) as client:
                counts = [0] * 4

                async def one(i: int):
                    result = []
                    async for chunk in await client.generate(PROMPTS[i], stream=True, max_tokens=64, temperature=0):
                        result += chunk.token_ids
                        counts[i] = len(result)
                        last = chunk
                    return result, last.finish_reason

                async def sigterm() -> str:
                    if not signal_it:
                        return ""
                    while min(counts) < 3:
                        await asyncio.sleep(0.01)
                    launcher.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.5)  # the streams have dozens of tokens left: they are still running
                    try:
                        await client.generate("Too late", max_tokens=2)
                    except Unavailable as exc:
                        return exc.message
                    return "accepted"

                *results, refused = await asyncio.gather(*(one(i) for i in range(4)), sigterm())
                return results, refused

        undisturbed, _ = asyncio.run(drain(False))
        assert sum(len(tokens) for tokens, _ in undisturbed) > 4 * 20
        results, refused = asyncio.run(drain(True))
        assert results == undisturbed  # every stream in flight ran to its end
        assert "draining" in refused
        children = now
        assert launcher.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=15)
        assert alive == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
