"""Forward's flow on a real worker (shard_worker/step_flow.py): replies in the order the requests came, a
refused request answered at once, a bound on the requests open on one stream (a flooding sender is not read
past it), and the steps queued for a stream that went away never run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest

from shard_worker.runtime import Metrics
from shard_worker.server import WorkerServer
from shard_worker.step_flow import Pending, StepFlow
from shardline.v1 import worker_pb2
from tests.helpers import error_of, load, seq, worker_stub

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture()
def worker(workers: Callable[[int], list[WorkerServer]], parameters: object) -> Iterator[WorkerServer]:
    (server,) = workers(1)
    load(server.address, "tiny-llama", 0, 6, parameters.address)  # type: ignore[attr-defined]
    yield server


@pytest.fixture()
def gate(worker: WorkerServer) -> Iterator[threading.Event]:
    """The worker's compute thread held until the event is set (a long step in front of the stream's)."""
    event = threading.Event()
    worker.servicer.compute.submit(lambda: event.wait(60))
    yield event
    event.set()


def step(step_id: int, session: str, start_layer: int = 0) -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(step_id=step_id, sequences=[seq(session, 0, 2)], token_ids=[5, 7],
                                     start_layer=start_layer, output=worker_pb2.OUTPUT_KIND_TOKENS)


def metrics(worker: WorkerServer) -> Metrics:
    assert worker.servicer.shard is not None
    return worker.servicer.shard.runtime.metrics


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


def test_a_flooding_sender_is_read_no_further_than_the_bound_and_replies_keep_their_order(worker, gate):
    worker.servicer.forward_bound = 4
    sent = 0

    def requests() -> Iterator[worker_pb2.ForwardRequest]:
        nonlocal sent
        for i in range(1, 41):
            sent += 1
            yield step(i, f"s{i}")

    call = worker_stub(worker.address).Forward(requests(), timeout=60)
    wait_for(lambda: metrics(worker).queued == 4, "4 steps queued")
    time.sleep(0.5)  # room to read more, were there no bound
    assert metrics(worker).queued == 4  # read and queued: the bound, no more (the rest waits in gRPC's windows)
    gate.set()
    replies = list(call)
    assert sent == 40
    assert [r.step_id for r in replies] == list(range(1, 41))  # the order they were sent in
    assert all(len(r.token_ids) == 1 and not r.HasField("error") and not r.sequence_errors for r in replies)
    wait_for(lambda: metrics(worker).queued == 0, "the queue drained")
    assert metrics(worker).steps == 40


def test_a_refused_request_is_answered_before_the_steps_queued_ahead_of_it(worker, gate):
    call = worker_stub(worker.address).Forward(iter([step(1, "a"), step(2, "b", start_layer=3), step(3, "c")]),
                                               timeout=60)
    first = next(call)  # the compute thread is still held: only the refusal can be answered
    assert first.step_id == 2 and first.error.code == INVALID and "start_layer 3" in first.error.message
    gate.set()
    rest = list(call)
    assert [r.step_id for r in rest] == [1, 3]
    assert all(not error_of(r).message for r in rest)


def test_steps_queued_for_a_cancelled_stream_never_run(worker, gate):
    release = threading.Event()

    def requests() -> Iterator[worker_pb2.ForwardRequest]:
        yield from (step(i, f"c{i}") for i in range(1, 4))
        release.wait(30)  # the stream stays open until the test cancels it

    call = worker_stub(worker.address).Forward(requests(), timeout=60)
    wait_for(lambda: metrics(worker).queued == 3, "3 steps queued")
    call.cancel()
    wait_for(lambda: metrics(worker).queued == 0, "the cancelled stream's steps dropped from the queue")
    release.set()
    gate.set()
    # none of them ran (no step counted, no session kept); the worker serves the next stream as before
    assert metrics(worker).steps == 0 and not worker.servicer.shard.runtime.sessions
    (reply,) = list(worker_stub(worker.address).Forward(iter([step(9, "after")]), timeout=60))
    assert reply.step_id == 9 and len(reply.token_ids) == 1 and not error_of(reply).message


# -- StepFlow itself, when answering a step fails in ways the servicer's callbacks should never produce -----
def flow_replies(answer: Callable[[Pending], object], fail: Callable[[Pending, Exception], object],
                 requests: Callable[[], AsyncIterator[int]] | None = None) -> list[object]:
    """The replies of a StepFlow over steps 1, 2, 3 (done at once); raises what ends the stream; never waits
    more than 5 s (a step left with no reply would hold the handler for good)."""
    async def steps() -> AsyncIterator[int]:
        for i in (1, 2, 3):
            yield i

    def accept(i: int) -> Pending:
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        future.set_result(i)
        return Pending(future, lambda: None, i)

    async def run() -> list[object]:
        flow = StepFlow((requests or steps)(), accept, answer, fail, bound=2)  # type: ignore[arg-type]
        return [reply async for reply in flow.replies()]

    return asyncio.run(asyncio.wait_for(run(), 5))


def test_a_step_whose_error_reply_raises_is_answered_with_an_internal_error(caplog):
    def answer(p: Pending) -> object:
        if p.data == 2:
            raise ValueError("answer")
        return ("ok", p.data)

    def fail(p: Pending, exc: Exception) -> object:
        if isinstance(exc, ValueError):
            raise TypeError("fail")
        return ("error", p.data, type(exc).__name__)

    assert flow_replies(answer, fail) == [("ok", 1), ("error", 2, "RuntimeError"), ("ok", 3)]
    assert "the error reply of a step raised" in caplog.text


@pytest.mark.parametrize("relayed", [False, True])
def test_a_step_with_no_reply_at_all_ends_the_stream_with_the_error_not_a_wait(relayed):
    def answer(p: Pending) -> object:
        if p.data != 3:
            return ("ok", p.data)
        if not relayed:
            raise ValueError("answer")

        async def relay() -> object:  # the last step, relayed to a next stage that fails
            raise ValueError("relay")
        return relay()

    def fail(p: Pending, exc: Exception) -> object:
        raise TypeError("fail")

    with pytest.raises(TypeError, match="fail"):
        flow_replies(answer, fail)


def test_a_failing_request_stream_ends_the_replies_with_its_error():
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise OSError("the request stream broke")

    with pytest.raises(OSError, match="the request stream broke"):
        flow_replies(lambda p: ("ok", p.data), lambda p, exc: ("error", p.data), broken)
