"""Prometheus metrics over HTTP, for every server role (README "Metrics").

Each server instance (a coordinator, a shard worker) keeps its metrics in a `CollectorRegistry` of its own,
never in prometheus_client's process-global default: tests run many coordinators and workers in one process,
and each must show only its own numbers. The endpoint serves prometheus_client's own WSGI exposition (what
`start_http_server` serves: text or OpenMetrics by the Accept header, gzip, `?name[]=` filtering) on a server
of ours, so that it can be stopped with the server it belongs to, and stops within a tenth of a second.

Names follow vLLM's habits with a `shardline:` prefix (`vllm:` there): counters end in `_total`, durations
are seconds, sizes bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

PREFIX = "shardline:"
POLL_INTERVAL_S = 0.1  # how soon a stop is noticed by the serving thread


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class MetricsServer:
    """A running /metrics endpoint: where it listens, and how to stop it."""

    def __init__(self, httpd: ThreadingWSGIServer, thread: threading.Thread, host: str) -> None:
        self._httpd, self._thread, self.host = httpd, thread, host

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and free the port (blocks for up to POLL_INTERVAL_S; see `close`)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    async def close(self) -> None:
        """`stop`, off the event loop."""
        await asyncio.to_thread(self.stop)


MAX_SCRAPES = 8  # scrapes served at once


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` at http://host:port/metrics (port 0 = a free one; `MetricsServer.port` says which) on
    a daemon thread. Binds exactly `host`, as the gRPC servers do. Raises OSError when the port is taken."""
    family, address = _family(host, port)

    class Server(ThreadingWSGIServer):
        """At most MAX_SCRAPES requests at once (a thread each); a connection beyond them is closed."""

        address_family = family
        slots = threading.BoundedSemaphore(MAX_SCRAPES)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

    httpd = make_server(address, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S},
                              name=f"metrics:{httpd.server_address[1]}", daemon=True)
    thread.start()
    server = MetricsServer(httpd, thread, host)
    log.info("metrics at %s", server.url)
    return server


def _family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family `host` needs (IPv6 for '::' and IPv6 literals), as http.server chooses it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])
