"""A whole cluster on this machine: the coordinator (with the parameter service in-process) and shard
workers as child processes on free ports, which register with the coordinator exactly as workers on other
hosts do. The launcher supervises its workers: one that dies is reported to the coordinator at once (which
heals the chain) and restarted with backoff, rejoining as a spare; a crash loop stops with a clear message.
Stops every child on Ctrl-C / SIGTERM."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.api.server import Coordinator, start_coordinator
from coordinator.config import CoordinatorConfig
from coordinator.fleet.planner import PlanDoesNotFit, StagePlan
from coordinator.fleet.registry import WorkerRecord
from shardline.server import Signals

log = logging.getLogger(__name__)
PREFIX = "shard worker listening on "
METRICS_PREFIX = "shard worker metrics at "  # printed before PREFIX by a worker given --metrics-port


@dataclass
class WorkerProcess:
    process: asyncio.subprocess.Process
    address: str
    metrics_url: str = ""                # where its /metrics is ("" = no metrics endpoint)
    metrics_port: int | None = None      # the port it was asked for (0 = any free one)


async def spawn_worker(host: str, coordinator: str = "", memory_budget_mb: int = 0,
                       log_level: str = "WARNING", extra: tuple[str, ...] = (),
                       metrics_port: int | None = None) -> WorkerProcess:
    args = ["--host", host, "--port", "0", "--log-level", log_level, "--parent-pid", str(os.getpid()), *extra]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    if coordinator:
        args += ["--coordinator", coordinator]
    if memory_budget_mb:
        args += ["--worker-memory-mb", str(memory_budget_mb)]
    # several workers share this machine's cores: OpenMP threads that spin while waiting would steal them
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    # a session of its own: Ctrl-C on the launcher reaches the launcher only, which drains, then stops it
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "shard_worker.cli", "serve", *args,
                                                   stdout=asyncio.subprocess.PIPE, env=env, start_new_session=True)
    if process.stdout is None:
        raise RuntimeError("no stdout from the worker process")
    said: list[str] = []
    metrics_url = ""
    while line := (await asyncio.wait_for(process.stdout.readline(), timeout=120)).decode():
        if line.startswith(PREFIX):
            return WorkerProcess(process, line.strip().removeprefix(PREFIX), metrics_url, metrics_port)
        if line.startswith(METRICS_PREFIX):
            metrics_url = line.strip().removeprefix(METRICS_PREFIX)
        said.append(line.strip())
    code = await process.wait()
    raise RuntimeError(f"shard worker exited with code {code} before listening (it said: {said[-3:]})")


async def stop_processes(processes: list[WorkerProcess], timeout: float = 8.0) -> None:
    for p in processes:
        with contextlib.suppress(ProcessLookupError):
            p.process.terminate()
    for p in processes:
        try:
            await asyncio.wait_for(p.process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.process.kill()
            await p.process.wait()


SPARES_AFTER_S = 30.0  # spares start once the planned workers registered, or this long after the start at most
CRASH_LOOP_RESTARTS = 5      # more restarts than this within CRASH_LOOP_WINDOW_S: stop restarting
CRASH_LOOP_WINDOW_S = 60.0


@dataclass
class Exits:
    """A supervisor's record of the processes that died lately: whether it is a crash loop, and the back-off
    before the next start (both launchers' supervisors)."""

    recent: collections.deque[float] = field(default_factory=collections.deque)

    def add(self) -> bool:
        """One more exit; True when it makes a crash loop (more than CRASH_LOOP_RESTARTS in the window)."""
        now = time.monotonic()
        self.recent.append(now)
        while self.recent and now - self.recent[0] > CRASH_LOOP_WINDOW_S:
            self.recent.popleft()
        return len(self.recent) > CRASH_LOOP_RESTARTS

    def backoff(self) -> float:
        """Before starting a process again: nothing the first time in a while, then 1, 2, 4 ... up to 10 s."""
        return min(10.0, 0.5 * 2 ** (len(self.recent) - 1)) if len(self.recent) > 1 else 0.0

    def __len__(self) -> int:
        return len(self.recent)


@dataclass
class LaunchSecurity:
    """What `launch` secures its processes with: the config's own certificates or token, else a throwaway
    CA and certificates (`secure`), else a random cluster token; files of its own live in `private` (0700),
    removed at stop."""

    config: CoordinatorConfig
    worker_args: tuple[str, ...] = ()
    private: Path | None = None
    lines: tuple[str, ...] = ()

    @classmethod
    def prepare(cls, config: CoordinatorConfig, secure: bool) -> LaunchSecurity:
        insecure = ("--insecure",) if config.insecure else ()
        if config.certs_dir is not None:
            return cls(config, ("--certs-dir", str(config.certs_dir), *insecure))
        if config.cluster_token_file is not None and not secure:
            return cls(config, ("--cluster-token-file", str(config.cluster_token_file), *insecure))
        private = Path(tempfile.mkdtemp(prefix="shardline-launch-"))  # 0700
        try:
            return cls._private(config, secure, private, insecure)
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise

    @classmethod
    def _private(cls, config: CoordinatorConfig, secure: bool, private: Path,
                 insecure: tuple[str, ...]) -> LaunchSecurity:
        from coordinator.cli.certs import create_ca, create_node, create_server
        from shardline.auth import new_token
        from shardline.tls import write_private

        if not secure:
            token = private / "cluster.token"
            write_private(token, new_token().encode())
            update: dict[str, object] = {"cluster_token_file": token}
            lines = cls._admin_key(config, private, update, keyless="client")
            return cls(config.model_copy(update=update), ("--cluster-token-file", str(token), *insecure), private,
                       lines)
        hosts = sorted({config.host, "localhost", "127.0.0.1"} - {"0.0.0.0", "::"}
                       | ({socket.gethostname()} if config.host in ("0.0.0.0", "::") else set()))
        create_ca(private, days=30)
        create_node(private, hosts)  # until the CA expires
        create_server(private, hosts)  # the HTTPS gateway's own key, apart from the node key
        update = {"certs_dir": private}
        lines = (f"mutual TLS on every link: throwaway CA and certificates in {private} (clients trust "
                 f"{private / 'ca.crt'})", *cls._admin_key(config, private, update))
        return cls(config.model_copy(update=update), ("--certs-dir", str(private), *insecure), private, lines)

    @staticmethod
    def _admin_key(config: CoordinatorConfig, private: Path, update: dict[str, object],
                   keyless: str | None = None) -> tuple[str, ...]:
        """Without a keys file of the user's: one with an admin key (in `private`), so that the cluster's admin
        calls (status, drain, load, scale) need it; `keyless`: the role of callers without a key (the default
        local launch serves them as clients)."""
        from shardline.auth import hash_key, new_api_key
        from shardline.tls import write_private

        if config.api_keys is not None:
            return ()
        key = new_api_key()
        write_private(private / "admin.key", key.encode())
        document: dict[str, object] = {"keys": [{"name": "launch-admin", "role": "admin", "sha256": hash_key(key)}]}
        if keyless is not None:
            document["keyless"] = keyless
        write_private(private / "api-keys.json", json.dumps(document).encode())
        update["api_keys"] = private / "api-keys.json"
        needs = "status, drain, load, scale need it" if keyless is not None else "every call needs it"
        return (f"admin API key in {private / 'admin.key'} ({needs}: export SHARDLINE_API_KEY=$(cat "
                f"{private / 'admin.key'}))",)

    def cleanup(self) -> None:
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)


@dataclass
class LocalCluster:
    config: CoordinatorConfig
    worker_memory_mb: int = 0
    spares: int = 0
    worker_args: tuple[str, ...] = ()  # how workers prove they belong (LaunchSecurity.worker_args)
    worker_log_level: str = "WARNING"
    coordinator: Coordinator | None = None
    processes: list[WorkerProcess] = field(default_factory=list)
    restarts: int = 0
    gave_up: str = ""
    _supervisor: asyncio.Task[None] | None = None
    _spares: asyncio.Future[list[None | BaseException]] | None = None

    def _spawn(self, metrics_port: int | None = None) -> Awaitable[WorkerProcess]:
        c = self.config
        extra = ("--keepalive-ms", str(c.keepalive_time_ms), "--step-timeout-ms", str(c.step_timeout_ms),
                 *self.worker_args)
        # with TLS, workers register on the coordinator's cluster port (mutual TLS); else on its one port
        registry = c.cluster_port if c.certs_dir is not None else c.port
        return spawn_worker(c.host, f"{c.host}:{registry}", self.worker_memory_mb, self.worker_log_level, extra=extra,
                            metrics_port=metrics_port)

    def _worker_metrics_port(self, index: int) -> int | None:
        """With the coordinator's metrics on port P, worker `index` gets P + 1 + index (fixed ports, for a
        static scrape config; a restarted worker takes the port of the one it replaces); with P = 0, a free
        port each; without metrics, none."""
        p = self.config.metrics_port
        return None if p is None else p + 1 + index if p else 0

    def metrics_lines(self) -> list[str]:
        """Where every /metrics of this cluster is, for the operator."""
        coordinator = self.coordinator.metrics_server if self.coordinator is not None else None
        if coordinator is None:
            return []
        lines = [f"metrics: coordinator {coordinator.url}"]
        records = {w.address: w for w in self.coordinator.fleet.registry.workers.values()} \
            if self.coordinator is not None else {}

        def role(p: WorkerProcess) -> tuple[str, int, str]:
            """In stage order: each replica's stages by their first layer, then the spares."""
            record = records.get(p.address)
            if record is None or record.stage is None:
                return ("~", 0, "spare")
            return (record.owner, record.stage.start, f"{record.owner} layers [{record.stage.start}, "
                                                      f"{record.stage.end})")

        serving = sorted(((role(p), p) for p in self.processes if p.metrics_url), key=lambda rp: rp[0])
        lines += [f"metrics: worker {p.address} ({what}) {p.metrics_url}" for (_, _, what), p in serving]
        return lines

    async def start(self, say: Callable[[str], None] = log.info) -> float:
        """Start everything and wait until every shard is loaded and verified; returns the seconds it took.
        Raises RuntimeError with the coordinator's reason when deployment fails (a plan that does not fit)."""
        began = time.perf_counter()
        if self.config.port == 0 or (self.config.certs_dir is not None and self.config.cluster_port == 0):
            raise ValueError("launch needs a fixed coordinator port (and, with TLS, cluster port) for its workers "
                             "to register with")
        # the coordinator and the workers start side by side; workers retry until the coordinator listens
        needed = sum(d.replicas * d.workers for d in self.config.initial_deployments())
        if self.config.metrics_port and self.config.metrics_port + needed + self.spares > 65535:
            raise ValueError(f"--metrics-port {self.config.metrics_port}: its {needed + self.spares} workers take the "
                             "ports after it, beyond 65535; choose a lower one (or 0: free ports)")
        # the workers the plan needs first; the spares once those have registered, so that the plan takes the
        # first ones and the metrics ports P+1 .. P+needed are the serving workers', the spares' after them
        spawning = [self._spawn(self._worker_metrics_port(i)) for i in range(needed)]
        coordinator, *processes = await asyncio.gather(start_coordinator(self.config, say), *spawning,
                                                       return_exceptions=True)
        self.processes = [p for p in processes if isinstance(p, WorkerProcess)]
        if isinstance(coordinator, BaseException):
            raise coordinator
        if not isinstance(coordinator, Coordinator):
            raise TypeError("start_coordinator returned no coordinator")
        self.coordinator = coordinator
        failed = [p for p in processes if isinstance(p, BaseException)]
        if failed:
            raise failed[0]
        try:
            return await self._until_ready(say, began, needed)
        except BaseException:
            if self._spares is not None:  # spares starting: each is recorded as it listens; the stop ends them
                self._spares.cancel()
                with contextlib.suppress(BaseException):
                    await self._spares
            raise

    async def _until_ready(self, say: Callable[[str], None], began: float, needed: int) -> float:
        assert self.coordinator is not None  # noqa: S101 - started by the caller
        fleet = self.coordinator.fleet
        shown, loading_bytes = -1, 0
        deadline = time.monotonic() + self.config.load_timeout_s + 120  # registration, then the loads
        # a planned worker that never registers (stuck, refused) is not waited for forever: the spares then start
        spares_by = time.monotonic() + SPARES_AFTER_S
        while fleet.state != "failed" and not fleet.settled:  # every replica placed and loaded, or failed
            if self._spares is None and (len(fleet.registry.workers) >= needed or time.monotonic() > spares_by
                                         or fleet.state != "waiting for workers"):
                self._spares = self._spawn_spares(needed)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {self.config.load_timeout_s + 120:.0f} s: {fleet.state} "
                                   f"({fleet.message})")
            waiting = asyncio.ensure_future(fleet.changed.wait())
            await asyncio.wait([waiting], timeout=0.5)
            waiting.cancel()
            done, total = fleet.progress
            if fleet.state == "deploying" and total:
                loading_bytes = max(loading_bytes, total)
                percent = min(99, int(100 * done / total))  # 100% once every stage is loaded and verified
                if percent // 25 != shown // 25:
                    shown = percent
                    say(f"  loading weights: {percent:3d}% of {total / 2**20:.0f} MiB")
            if any(p.process.returncode is not None for p in self.processes):
                raise RuntimeError("a shard worker exited during start-up")
        if fleet.state == "failed":
            raise RuntimeError(fleet.message)
        if self._spares is None:
            self._spares = self._spawn_spares(needed)
        failed = [p for p in await self._spares if isinstance(p, BaseException)]
        if failed:
            raise failed[0]
        registered_by = time.monotonic() + SPARES_AFTER_S  # "ready ... and N spares": registered, as said
        while len(fleet.registry.workers) < needed + self.spares:
            if time.monotonic() > registered_by:
                say(f"  {needed + self.spares - len(fleet.registry.workers)} spare(s) not registered yet")
                break
            await asyncio.sleep(0.05)
        loaded = loading_bytes or sum(s.weight_bytes for r in fleet.replicas for s in r.stages)
        say(f"  loading weights: 100% of {loaded / 2**20:.0f} MiB")
        self._supervisor = asyncio.create_task(self._supervise(say))
        return time.perf_counter() - began

    def _spawn_spares(self, needed: int) -> asyncio.Future[list[None | BaseException]]:
        """The spares, each in `processes` as soon as it listens (a stop meanwhile ends it)."""
        async def one(i: int) -> None:
            self.processes.append(await self._spawn(self._worker_metrics_port(needed + i)))

        return asyncio.gather(*(one(i) for i in range(self.spares)), return_exceptions=True)

    async def _supervise(self, say: Callable[[str], None]) -> None:
        """Restart worker processes that die, with backoff; give up on a crash loop."""
        exits = Exits()
        while not self.gave_up:
            await asyncio.sleep(0.2)
            try:
                await self._restart_dead(exits, say)
            except Exception:  # noqa: BLE001 - the supervisor itself must not die silently
                log.exception("worker supervision failed once; it goes on")

    async def _restart_dead(self, exits: Exits, say: Callable[[str], None]) -> None:
        """Report each worker process that exited, and start another in its place (it joins as a spare)."""
        for dead in [p for p in self.processes if p.process.returncode is not None]:
            self.processes.remove(dead)
            why = f"its process exited with code {dead.process.returncode}"
            if self.coordinator is not None:
                self.coordinator.fleet.report_dead(dead.address, why)
            if exits.add():
                self.gave_up = (f"worker processes keep dying ({len(exits)} exits in {CRASH_LOOP_WINDOW_S:.0f} s, "
                                f"the last one: {why}); not restarting them any more: see the workers' log")
                say(f"error: {self.gave_up}")
                return
            say(f"worker {dead.address}: {why}; restarting it")
            await asyncio.sleep(exits.backoff())
            try:
                self.processes.append(await self._spawn(dead.metrics_port))
                self.restarts += 1
                if self.coordinator is not None:
                    self.coordinator.fleet.metrics.restarts.inc()
            except (RuntimeError, OSError, TimeoutError) as exc:
                say(f"error: restarting a worker failed: {exc}")

    async def drain(self, grace_s: float) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()  # workers that exit now are not restarted
        if self.coordinator is not None:
            await self.coordinator.fleet.drain(grace_s)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.coordinator is not None:
            await self.coordinator.stop()
        await stop_processes(self.processes)


def shared_memory_mb(workers: int, available_bytes: int | None = None) -> int:
    """What each of the `workers` workers `launch` starts on this machine offers by default: 80% of the memory
    available now (shardline/limits.py), divided among them, so that together they never offer more than the
    machine has."""
    from shardline.limits import default_memory_budget

    total = default_memory_budget() if available_bytes is None else int(available_bytes * 0.8)
    return max(1, total // max(1, workers) // 2**20)


def preflight_plan(config: CoordinatorConfig, worker_memory_mb: int) -> list[str]:
    """Before anything is spawned: the plan of every replica `launch` will start, on workers offering
    `worker_memory_mb` (0: what a worker offers by default, 80% of the memory available now), as lines;
    PlanDoesNotFit (with what is missing) when it cannot fit. The workers' own budgets decide at
    deployment; this catches a plan that cannot fit at once, instead of after every worker registered."""
    from coordinator.fleet.placement import Wanted, interleave, place
    from coordinator.store.models import ModelStore
    from shardline.limits import default_memory_budget, shard_share

    store = ModelStore(config.store)
    # a worker's --worker-memory-mb bounds its process: its runtime (estimated here) comes off it
    budget = shard_share(worker_memory_mb * 2**20) if worker_memory_mb else default_memory_budget()
    specs = config.initial_deployments()
    wanted = interleave([[Wanted(s.key, store.manifest(s.model), s.workers)] * s.replicas for s in specs])
    pool = [WorkerRecord(f"w{i + 1}", f"worker {i + 1}", budget, 0.0)
            for i in range(sum(w.stages for w in wanted))]
    placement = place(wanted, pool)
    if placement.unplaced:
        raise PlanDoesNotFit("; ".join(placement.unplaced.values()))
    return [format_plan(want.key, [w for w, _ in chain], [p for _, p in chain]) for want, chain in placement.placed]


def format_plan(model: str, workers: list[WorkerRecord], stages: list[StagePlan]) -> str:
    lines = [f"plan for {model}:",
             f"  {'worker':<22} {'layers':<10} {'weights':>11} {'offered':>11}"]
    for worker, s in zip(workers, stages, strict=True):
        extra = ("  +embedding" if s.start == 0 else "") + ("  +head" if s is stages[-1] else "")
        lines.append(f"  {worker.address:<22} {f'[{s.start}, {s.end})':<10} {s.weight_bytes / 2**20:>7.1f} MiB "
                     f"{worker.memory_budget_bytes / 2**20:>7.0f} MiB{extra}")
    return "\n".join(lines)


async def wait_for_signal() -> None:
    await Signals().first.wait()
