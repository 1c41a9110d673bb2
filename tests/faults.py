"""Fault injection for the tests: a TCP proxy put between two stages (or any client and server) that can
delay, stall, cut and reset the link. The kernel here has no netem, so faults are made in user space.

    proxy = await FaultProxy.start("127.0.0.1:5001")    # listens on 127.0.0.1:<free port>
    proxy.delay_s = 0.05        # every chunk waits this long before it goes on
    proxy.rate_bytes_s = 100e6  # each direction of each connection moves at most this many bytes a second
    proxy.stall()               # connections open now stop moving bytes (held, not lost) ...
    proxy.resume()              # ... until resumed; new connections flow meanwhile
    proxy.reset()               # every open connection is aborted with a TCP RST
    proxy.cut()                 # every open connection is closed (FIN)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target_host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.delay_s = 0.0
        self.rate_bytes_s = 0.0  # bandwidth cap per direction of a connection; 0 = none
        self.connections = 0
        self._pairs: set[_Pair] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @classmethod
    async def start(cls, target: str) -> FaultProxy:
        proxy = cls(target)
        proxy._server = await asyncio.start_server(proxy._accept, "127.0.0.1", 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        return proxy

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        pair = _Pair(writer, up_writer)
        pair.flowing.set()
        self._pairs.add(pair)
        pair.tasks = [asyncio.create_task(self._pump(reader, up_writer, pair)),
                      asyncio.create_task(self._pump(up_reader, writer, pair))]
        await asyncio.gather(*pair.tasks, return_exceptions=True)
        self._pairs.discard(pair)
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair) -> None:
        loop = asyncio.get_running_loop()
        free_at = 0.0  # with a bandwidth cap: when the bytes sent so far have left the link
        try:
            while chunk := await reader.read(65536):
                await pair.flowing.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.rate_bytes_s:
                    now = loop.time()
                    free_at = max(now, free_at) + len(chunk) / self.rate_bytes_s
                    await asyncio.sleep(free_at - now)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def stall(self) -> None:
        for pair in self._pairs:
            pair.flowing.clear()

    def resume(self) -> None:
        for pair in self._pairs:
            pair.flowing.set()

    def reset(self) -> None:
        for pair in list(self._pairs):
            for w in (pair.client, pair.server):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
            for task in pair.tasks:
                task.cancel()

    def cut(self) -> None:
        for pair in list(self._pairs):
            for w in (pair.client, pair.server):
                w.close()

    async def close(self) -> None:
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
