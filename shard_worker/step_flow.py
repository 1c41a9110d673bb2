"""One Forward call's plumbing, with as few hand-offs per step as the compute thread allows.

A reader task takes each request off the stream and queues its step on the compute thread at once; the
thread's completion wakes the event loop once, and that callback answers the finished steps in the order they
were received (a reply, or a relay to the next stage) and hands the reply to the handler, which writes it. So a
step costs: the read, the compute thread, one loop callback, the write; no task and no queue in between.

Bounded: at most `bound` requests are open (received, their reply not yet written). At the bound the reader
stops reading, so a sender that floods the stream meets gRPC's flow control instead of growing this worker's
memory; it reads on as replies are written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Pending:
    """A step queued on the compute thread: `future` is its result; `settle` runs on the loop once it is done
    (cancelled included), `data` is what answering it needs."""

    future: concurrent.futures.Future[Any]
    settle: Callable[[], None]
    data: Any


class StepFlow(Generic[R]):
    """`accept(request)` queues a request's step (a `Pending`) or answers it at once (a reply, e.g. an error);
    `answer(pending)` turns a finished step into its reply (or a coroutine returning it); `fail(pending, exc)`
    is the reply when answering raised. Iterate `replies()` in the handler: it ends once the requests have
    ended and every one of them is answered, or raises the error that ended the request stream (or that left
    a step with no reply at all: see `_failure`)."""

    def __init__(self, requests: AsyncIterable[Any], accept: Callable[[Any], Pending | R],
                 answer: Callable[[Pending], R | Coroutine[Any, Any, R]], fail: Callable[[Pending, Exception], R],
                 bound: int) -> None:
        if bound < 1:
            raise ValueError(f"bound must be >= 1, got {bound}")
        self._loop = asyncio.get_running_loop()
        self._requests = requests
        self._accept, self._answer, self._fail = accept, answer, fail
        self.bound = bound
        self.open = 0                              # requests received whose reply is not written yet
        self._steps: deque[Pending] = deque()      # on the compute thread, in the order received
        self._ready: deque[R] = deque()            # replies for the handler to write
        self._relays: set[asyncio.Task[None]] = set()
        self._reading = True
        self._closed = False
        self._wake: asyncio.Future[None] | None = None   # the handler waits for a reply
        self._room: asyncio.Future[None] | None = None   # the reader waits for room under the bound
        self._error: Exception | None = None             # the stream ends with it (replies() raises it)

    async def replies(self) -> AsyncGenerator[R, None]:
        reader = self._loop.create_task(self._read())
        try:
            while True:
                if self._error is not None:
                    raise self._error
                if self._ready:
                    yield self._ready.popleft()
                    self.open -= 1  # written: gRPC took it (its flow control holds the yield until then)
                    room = self._room
                    if room is not None and self.open < self.bound:
                        self._room = None
                        if not room.done():
                            room.set_result(None)
                    continue
                if not (self._reading or self._steps or self._relays):
                    return
                self._wake = wake = self._loop.create_future()
                await wake
        finally:
            self._closed = True
            reader.cancel()
            for relay in list(self._relays):
                relay.cancel()
            for pending in self._steps:  # queued for a stream that is gone: never run (a running one ends)
                pending.future.cancel()

    async def _read(self) -> None:
        try:
            requests = aiter(self._requests)
            while True:
                while self.open >= self.bound:
                    self._room = room = self._loop.create_future()
                    await room
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return
                self.open += 1
                step = self._accept(request)
                if isinstance(step, Pending):
                    self._steps.append(step)
                    step.future.add_done_callback(functools.partial(self._done_on_thread, step))
                else:
                    self._push(step)
        except Exception as exc:  # noqa: BLE001 - the request stream failed: the handler ends with its error
            self._end(exc)
        finally:
            self._reading = False
            self._notify()

    def _done_on_thread(self, pending: Pending, _: concurrent.futures.Future[Any]) -> None:
        """On the compute thread (or the loop, for a cancelled step): one wake-up of the loop."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._done, pending)

    def _done(self, done: Pending) -> None:
        done.settle()  # once for each step, as it finishes (out of order, with several compute threads)
        if self._closed:
            return
        steps = self._steps
        while steps and steps[0].future.done():  # answered in the order received
            pending = steps.popleft()
            answer: R | Coroutine[Any, Any, R] | None
            try:
                answer = self._answer(pending)
            except Exception as exc:  # noqa: BLE001 - a reply all the same: the stream and the peer go on
                answer = self._failure(pending, exc)
            if answer is None:
                return  # no reply could be made: the stream ends (_failure)
            if isinstance(answer, Coroutine):
                relay = self._loop.create_task(self._relay(pending, answer))
                self._relays.add(relay)
            else:
                self._push(answer)

    async def _relay(self, pending: Pending, answer: Coroutine[Any, Any, R]) -> None:
        reply: R | None
        try:
            reply = await answer
        except Exception as exc:  # noqa: BLE001
            reply = self._failure(pending, exc)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._relays.discard(task)
            self._notify()  # the handler may be waiting on this relay alone
        if reply is not None:
            self._push(reply)

    def _failure(self, pending: Pending, exc: Exception) -> R | None:
        """`fail`'s reply for a step whose answer raised. Should `fail` raise too: an internal error's reply for
        the step (logged); should that raise as well, None, and the stream ends with that error: never a step
        left with no reply, which would hold its place under the bound, or the handler, for good."""
        try:
            return self._fail(pending, exc)
        except Exception:  # noqa: BLE001
            log.exception("the error reply of a step raised; the step is answered with an internal error")
        try:
            return self._fail(pending, RuntimeError(f"no reply for the step's {type(exc).__name__}"))
        except Exception as again:  # noqa: BLE001
            log.exception("no reply for a step could be made; the stream ends")
            self._end(again)
            return None

    def _end(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._notify()

    def _push(self, reply: R) -> None:
        if self._closed:
            return
        self._ready.append(reply)
        self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            if not wake.done():
                wake.set_result(None)
