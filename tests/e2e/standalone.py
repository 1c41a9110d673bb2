"""A standalone cluster of real processes for the e2e tests: `coordinator serve --config FILE` (in a session of
its own, so a SIGKILL takes it alone) and workers that join it with `shard-worker serve --coordinator`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO


class Standalone:
    """The coordinator's output (both lives) goes to `coordinator.log` beside its config; `close` prints its
    tail, which pytest shows when the test failed."""

    def __init__(self, config: Path, endpoint: str) -> None:
        self.config, self.endpoint = config, endpoint
        self.log_path = config.parent / "coordinator.log"
        self.out: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed by close()
        self.coordinator = self._coordinator()
        self.workers: list[subprocess.Popen] = []
        self.addresses: list[str] = []  # each worker's, in the order they were started

    @classmethod
    def serving(cls, store: Path, directory: Path, **settings: object) -> Standalone:
        """A coordinator serving tiny-llama from `store` on a free port, its config, jobs and fleet state in
        `directory`; `settings` are the config's other lines (strings quoted, booleans as TOML's)."""
        from tests.e2e.test_join_and_generate import free_port

        port = free_port()
        lines = {"store": str(store), "port": port, "model": "tiny-llama", "jobs_dir": str(directory), **settings}
        config = directory / "coordinator.toml"
        config.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in lines.items()))
        return cls(config, f"127.0.0.1:{port}")

    def _coordinator(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(self.config)],
                                stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def add_workers(self, n: int, *extra: str) -> None:
        """`n` workers joining the coordinator; `extra`: more of `shard-worker serve`'s arguments."""
        from tests.e2e.test_join_and_generate import free_port

        for _ in range(n):
            port = free_port()
            self.addresses.append(f"127.0.0.1:{port}")
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "shard_worker.cli", "serve", "--port", str(port), "--coordinator",
                 self.endpoint, "--log-level", "WARNING", *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def kill_coordinator(self) -> None:
        os.killpg(self.coordinator.pid, signal.SIGKILL)
        self.coordinator.wait(10)

    def restart_coordinator(self) -> None:
        """A new life on the same config and store (after kill_coordinator)."""
        self.coordinator = self._coordinator()

    def close(self) -> None:
        processes = [self.coordinator, *self.workers]
        for p in processes:
            p.kill()
        for p in processes:
            p.wait(10)
        self.out.close()
        print(f"--- the coordinator's log, its end ({self.log_path}):\n{self.log_path.read_text()[-6000:]}")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)
