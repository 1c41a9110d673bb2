"""An ASGI app served by uvicorn in an event loop (the HTTP gateway: on a thread and loop of its own beside the
coordinator, `LoopThread`, or alone): on a socket bound to exactly the host it is told, under a supervisor that
serves it again if uvicorn ends on its own, stopped by its owner (never by uvicorn's own signal handling),
freeing its port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

log = logging.getLogger(__name__)
RESTARTS = 5  # uvicorn ending on its own this many times: the supervisor gives up (and says so)
T = TypeVar("T")


class LoopThread:
    """An event loop running on a daemon thread of its own. `run` runs a coroutine there and waits for it,
    with a deadline, from another loop; `close` stops the loop (what still runs on it is cancelled) and
    joins the thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:  # what still runs is cancelled and given the chance to end (its finally blocks run)
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def run(self, work: Coroutine[Any, Any, T], timeout_s: float) -> T:
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except BaseException:
            future.cancel()
            raise

    async def close(self, timeout_s: float = 10.0) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join, timeout_s)
        if self.thread.is_alive():
            log.warning("the %s thread did not end within %g s", self.thread.name, timeout_s)


@dataclass(frozen=True)
class Https:
    cert: Path
    key: Path
    client_ca: Path | None = None  # require client certificates from this CA


class _Server(uvicorn.Server):
    """uvicorn inside a process that owns its signals: the coordinator's CLI drains on the first SIGTERM and
    stops the server itself (uvicorn would otherwise take over SIGINT/SIGTERM while it serves)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on exactly host:port (0 = a free port); OSError naming the address if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections of a socket that says
    # so, and with Nagle on, an event written right after the headers waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of the last run is no obstacle
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}") from None
    return sock


def uvicorn_config(app: Any, https: Https | None, max_connections: int, grace_s: float) -> uvicorn.Config:
    """uvicorn's settings; loaded here, so that unusable certificate files stop the start, not the server.
    More than `max_connections` at once are answered 503 by uvicorn."""
    tls: dict[str, Any] = {}
    if https is not None:
        tls = dict(ssl_certfile=str(https.cert), ssl_keyfile=str(https.key))
        if https.client_ca is not None:
            tls.update(ssl_ca_certs=str(https.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, server_header=False,
                            ws="none", limit_concurrency=max_connections, timeout_keep_alive=5,
                            timeout_graceful_shutdown=max(int(grace_s), 1), **tls)
    config.load()
    # uvicorn's "Started server process" / "Finished server process" lines say nothing true in-process: warnings only
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    return config


class ServedApp:
    """uvicorn serving on its socket in this event loop, supervised; `stop` ends it and frees the port."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, host: str, grace_s: float) -> None:
        self.config, self.sock, self.grace_s = config, sock, grace_s
        self.host, self.port = host, int(sock.getsockname()[1])
        self.scheme = "https" if config.is_ssl else "http"
        self.stopping = False
        self.server = _Server(config)
        self.task = asyncio.create_task(self._supervise(), name=f"http server {self.address}")

    @property
    def address(self) -> str:
        return f"[{self.host.strip('[]')}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def _supervise(self) -> None:
        ended = 0
        while True:
            try:
                await self.server.serve(sockets=[self.sock])
            except Exception:  # noqa: BLE001 - logged, then served again
                log.exception("the HTTP server on %s failed", self.address)
            if self.stopping:
                return
            ended += 1
            if ended > RESTARTS:
                log.error("the HTTP server on %s keeps ending (%d times); it stays down", self.address, ended)
                return
            log.error("the HTTP server on %s ended on its own; serving again", self.address)
            await asyncio.sleep(min(5.0, 0.2 * 2**ended))
            if self.stopping:  # stopped during the back-off: do not listen again
                return
            try:
                self.sock = listen(self.host, self.port)  # uvicorn closed the old socket as it ended
            except OSError:
                log.exception("the HTTP server cannot listen again")
                return
            self.server = _Server(self.config)

    async def stop(self) -> None:
        """Stop taking requests, give those in flight `grace_s` (then cancel them), free the port."""
        self.stopping = True
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), self.grace_s + 5)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.sock.close()


def serve_app(app: Any, host: str, port: int, https: Https | None = None, max_connections: int = 1000,
              grace_s: float = 1.0) -> ServedApp:
    """Serve `app` on exactly host:port (0 = a free port) from now on; OSError if the port cannot be had."""
    config = uvicorn_config(app, https, max_connections, grace_s)
    return ServedApp(config, listen(host, port), host, grace_s)
