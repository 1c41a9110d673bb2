"""Soak: `coordinator launch` (3 workers + 1 spare, SmolLM2) under 32 concurrent streams of mixed lengths
for MINUTES, with the process of a chain worker SIGKILLed every KILL_EVERY seconds; launch restarts it.

Reports requests completed, errors (target 0), and at the start and the end: RSS and open file
descriptors of the launcher (coordinator) and its workers, and KV bytes held on the workers (after the
last requests end, target 0). Start: once the first round of requests has completed.

    python bench/soak.py [--minutes 10] [--kill-every 120] [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline.client import AsyncClient, Client  # noqa: E402
from shardline.errors import ShardlineError  # noqa: E402

# prompts that run to max_tokens (instruction prompts without the chat template end after a token or two)
CITIES = ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Delhi", "Tokyo", "Madrid", "Berlin", "Vienna", "Lagos", "Quito"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resources(launcher: psutil.Process) -> dict[str, int]:
    procs = [launcher, *launcher.children()]
    return {"rss_mib": sum(p.memory_info().rss for p in procs) // 2**20, "fds": sum(p.num_fds() for p in procs),
            "processes": len(procs)}


def kv_bytes(endpoint: str) -> int:
    with Client(endpoint, timeout=30) as client:
        return sum(w.kv_cache_bytes for w in client.cluster_status().workers)


def chain_worker_pid(endpoint: str, launcher: psutil.Process) -> int:
    with Client(endpoint, timeout=30) as client:
        ports = {int(w.address.rsplit(":", 1)[1]) for w in client.cluster_status().workers if w.state == "ready"}
    for child in launcher.children():
        if any(c.laddr.port in ports and c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
            return child.pid
    raise RuntimeError("no chain worker found among the launcher's children")


async def soak(endpoint: str, launcher: psutil.Process, minutes: float, kill_every: float) -> None:
    stats = {"completed": 0, "errors": 0, "tokens": 0}
    errors: list[str] = []
    end = time.monotonic() + minutes * 60
    rng = random.Random(0)
    started = asyncio.Event()

    async def user(i: int) -> None:
        async with AsyncClient(endpoint, timeout=600) as client:
            while time.monotonic() < end:
                prompt = f"The history of the city of {rng.choice(CITIES)} began"
                try:
                    result = await client.generate(prompt, max_tokens=rng.choice([8, 16, 32, 64, 128]),
                                                   temperature=rng.choice([0, 0.8]), seed=i)
                    stats["completed"] += 1
                    stats["tokens"] += result.completion_tokens
                except ShardlineError as exc:
                    stats["errors"] += 1
                    errors.append(f"{exc.code.name}: {exc.message}")
                if stats["completed"] >= 32:
                    started.set()

    async def killer() -> None:
        await started.wait()
        before = await asyncio.to_thread(resources, launcher)
        print(f"start: {before}, KV bytes {await asyncio.to_thread(kv_bytes, endpoint)}", flush=True)
        kills = 0
        while time.monotonic() + kill_every < end:
            await asyncio.sleep(kill_every)
            pid = await asyncio.to_thread(chain_worker_pid, endpoint, launcher)
            os.kill(pid, signal.SIGKILL)
            kills += 1
            print(f"{time.strftime('%H:%M:%S')} killed worker pid {pid} ({kills}); so far {stats}", flush=True)

    began = time.monotonic()
    await asyncio.gather(*(user(i) for i in range(32)), killer())
    took = time.monotonic() - began
    await asyncio.sleep(3)  # sessions of the last requests are freed between steps
    after = resources(launcher)
    with Client(endpoint, timeout=30) as client:
        status = client.cluster_status()
    print(f"end: {after}, KV bytes {kv_bytes(endpoint)}; recoveries {status.recoveries}", flush=True)
    print(f"requests completed {stats['completed']}, errors {stats['errors']}, tokens {stats['tokens']} "
          f"({stats['tokens'] / max(1, stats['completed']):.1f} per request; {stats['tokens'] / took:.1f} tok/s over "
          f"{took / 60:.1f} min)", flush=True)
    for line in sorted(set(errors))[:10]:
        print(f"  error: {line}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--kill-every", type=float, default=120)
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    store = args.store or Path(tempfile.mkdtemp(prefix="shardline-soak-"))
    if not ModelStore(store).has("smollm2"):
        import_gguf(ModelStore(store), builtin_gguf(), "smollm2")
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    env = {**os.environ, "SHARDLINE_STORE": str(store)}
    process = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", "--workers", "3", "--spares", "1",
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "serving; Ctrl-C" in line:
                break
        else:
            raise SystemExit("launch did not become ready")
        said: list[str] = []  # keep reading what launch says, so its pipe never fills
        threading.Thread(target=lambda: said.extend(process.stdout or []), daemon=True).start()
        asyncio.run(soak(endpoint, psutil.Process(process.pid), args.minutes, args.kill_every))
        print("launch said:\n" + "".join(line for line in said if "recover" in line or "restart" in line), flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    main()
