"""The one stage-stream primitive: every data-plane Forward stream (coordinator -> first stage, and each
stage -> the next) is a StageStream.

- many steps multiplexed on one long-lived bidirectional stream, each matched to its reply by a step id;
- a deadline per step: a stage that does not answer in time fails the step with DEADLINE_EXCEEDED naming
  it, and the connection is dropped (a stalled link is not trusted with the next step);
- a bounded window of steps in flight: `step` waits for room instead of queueing without limit;
- a broken stream (peer gone, reset, garbage) fails every pending step at once with UNAVAILABLE naming the
  peer and the reason;
- reconnection on the next step, on a fresh channel (a stalled TCP connection is never reused), with
  exponential backoff while connections keep failing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from shardline.auth import ClusterIdentity
from shardline.codec import RawTensor
from shardline.errors import DeadlineExceeded, Unavailable
from shardline.server import Keepalive, channel
from shardline.tensor_wire import Beside
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)

HIDDEN_FIELD = worker_pb2.ForwardRequest.DESCRIPTOR.fields_by_name["hidden"].number
FORWARD = "/" + worker_pb2.DESCRIPTOR.services_by_name["ShardWorker"].full_name + "/Forward"


@dataclass(frozen=True)
class LinkSettings:
    """The settings every stage stream of a process shares (one per role's config)."""

    step_timeout_ms: int = 60_000   # a step not answered within this fails (and the link is reset)
    window: int = 64                # steps in flight on one stream at most
    backoff_initial_ms: int = 50    # first wait before reconnecting after a failed connection
    backoff_max_ms: int = 2_000
    keepalive: Keepalive = Keepalive()
    identity: ClusterIdentity = ClusterIdentity()  # how this process proves it belongs to the cluster
    epoch: str = ""  # a coordinator's: its life, named on its control calls to workers (shardline/fencing.py)


# a ForwardRequest and its hidden states, kept apart until they go on the wire (shardline/tensor_wire.py)
Outgoing = Beside[worker_pb2.ForwardRequest]


class _Connection:
    """One channel and one Forward call on it; dead for good once it breaks."""

    def __init__(self, target: str, settings: LinkSettings) -> None:
        self.target = target
        self.channel = channel(target, settings.keepalive, settings.identity)
        self.queue: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future[worker_pb2.ForwardResponse]] = {}
        self.answered = 0
        self.reason = ""
        self.closing: asyncio.Task[None] | None = None
        forward = self.channel.stream_stream(FORWARD, request_serializer=Outgoing.serialize,
                                             response_deserializer=worker_pb2.ForwardResponse.FromString)
        self.call = forward(self._requests(), metadata=settings.identity.metadata)
        self.reader = asyncio.create_task(self._read())

    @property
    def broken(self) -> bool:
        return bool(self.reason)

    async def _requests(self) -> AsyncIterator[Outgoing]:
        while (msg := await self.queue.get()) is not None:
            yield msg

    async def _read(self) -> None:
        reason = "the stream ended"
        try:
            async for response in self.call:
                self.answered += 1
                future = self.pending.pop(response.step_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.RpcError as err:
            reason = f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            reason = self.reason or "the stream was closed"
        except Exception as exc:  # noqa: BLE001 - a reader must never die silently
            reason = f"unreadable reply: {exc}"
            log.exception("stream to %s failed", self.target)
        self.fail(Unavailable(f"stage {self.target} is unreachable ({reason})"))

    def fail(self, error: Exception) -> None:
        """Break the connection: every pending step gets `error`; the channel closes in the background."""
        if not self.reason:
            self.reason = str(error)
            self.queue.put_nowait(None)
            self.call.cancel()
            self.closing = asyncio.get_running_loop().create_task(self.channel.close(None))  # kept: not collected
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()

    def send(self, step_id: int, msg: Outgoing) -> asyncio.Future[worker_pb2.ForwardResponse]:
        future: asyncio.Future[worker_pb2.ForwardResponse] = asyncio.get_running_loop().create_future()
        self.pending[step_id] = future
        self.queue.put_nowait(msg)
        return future


class StageStream:
    """Steps to one stage (`target`), with their replies. Safe to share between many concurrent callers."""

    def __init__(self, target: str, settings: LinkSettings | None = None) -> None:
        self.target = target
        self.settings = settings or LinkSettings()
        self._window = asyncio.Semaphore(self.settings.window)
        self._ids = itertools.count(1)
        self._conn: _Connection | None = None
        self._failures = 0          # connections in a row that broke before answering anything
        self._not_before = 0.0      # monotonic time before which no new connection is opened
        self._closed = False
        self.connections = 0        # connections opened so far (1 = never reconnected)

    @property
    def in_flight(self) -> int:
        return len(self._conn.pending) if self._conn is not None else 0

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.broken:
            return conn
        if conn is not None:
            if conn.answered == 0:
                self._failures += 1
                delay = min(self.settings.backoff_max_ms, self.settings.backoff_initial_ms * 2 ** (self._failures - 1))
                self._not_before = max(self._not_before, time.monotonic() + delay / 1000)
            else:
                self._failures = 0
            self._conn = None
        wait = self._not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._closed:
            raise Unavailable(f"the stream to stage {self.target} is closed")
        if self._conn is None or self._conn.broken:  # another caller may have reconnected meanwhile
            self._conn = _Connection(self.target, self.settings)
            self.connections += 1
            if self.connections > 1:
                log.info("reconnected to stage %s (connection %d)", self.target, self.connections)
        return self._conn

    async def step(self, request: worker_pb2.ForwardRequest, hidden: RawTensor | None = None,
                   timeout_s: float | None = None) -> worker_pb2.ForwardResponse:
        """Send one step and wait for its reply. The request's step_id is replaced by a stream-local one and
        its timeout_ms set to what is left of the deadline (each stage passes the remainder on)."""
        timeout = timeout_s if timeout_s is not None else self.settings.step_timeout_ms / 1000
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.001, deadline - time.monotonic())

        # the common case (room in the window, a live connection) takes no task and no timer: a step's latency
        # is the hop's
        if self._window.locked():
            try:
                await asyncio.wait_for(self._window.acquire(), timeout)
            except TimeoutError:
                raise DeadlineExceeded(f"stage {self.target}: no room among the {self.settings.window} steps in "
                                       f"flight within {timeout:.1f} s") from None
        else:
            await self._window.acquire()
        try:
            conn = self._conn
            if conn is None or conn.broken or self._closed:
                try:
                    conn = await asyncio.wait_for(self._connection(), left())
                except TimeoutError:
                    raise DeadlineExceeded(f"could not reach stage {self.target} within {timeout:.1f} s "
                                           "(reconnecting with backoff)") from None
            if conn.broken:  # it broke while this step waited to connect
                raise Unavailable(f"stage {self.target} is unreachable ({conn.reason})")
            step_id = next(self._ids)
            request.step_id = step_id
            request.timeout_ms = int(left() * 1000) + 1
            future = conn.send(step_id, Outgoing(request, HIDDEN_FIELD, hidden))
            timer = asyncio.get_running_loop().call_later(left(), self._missed, conn, future, timeout)
            try:
                return await future
            finally:
                timer.cancel()
        finally:
            self._window.release()

    def _missed(self, conn: _Connection, future: asyncio.Future[worker_pb2.ForwardResponse], timeout: float) -> None:
        """A step's deadline passed: it fails, and so does its connection (a stalled link is not trusted)."""
        if future.done():
            return
        future.set_exception(DeadlineExceeded(f"no answer within {timeout:.1f} s from stage {self.target} (it, or a "
                                              "stage after it on the route, stalled)"))
        conn.fail(Unavailable(f"stage {self.target} stalled: a step on its stream missed its deadline of "
                              f"{timeout:.1f} s"))

    def reset(self, reason: str) -> None:
        """Drop the current connection (its pending steps fail); the next step reconnects."""
        if self._conn is not None:
            self._conn.fail(Unavailable(f"stage {self.target}: {reason}"))

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(Unavailable(f"the stream to stage {self.target} was closed"))
            conn.reader.cancel()
            await conn.channel.close(None)


class StageStreams:
    """A process's streams, one per target stage, opened on first use and shared by every caller."""

    def __init__(self, settings: LinkSettings | None = None) -> None:
        self.settings = settings or LinkSettings()
        self._streams: dict[str, StageStream] = {}

    def get(self, target: str) -> StageStream:
        stream = self._streams.get(target)
        if stream is None:
            stream = self._streams[target] = StageStream(target, self.settings)
        return stream

    @property
    def reconnects(self) -> int:
        return sum(s.connections - 1 for s in self._streams.values() if s.connections)

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            await stream.close()
