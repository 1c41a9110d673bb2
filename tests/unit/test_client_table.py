"""Client and AsyncClient are thin methods over one table of calls (shardline.client_calls): they offer the
same calls with the same signatures, each call is in the table, and the table does its work without a
server (validation before anything is sent, paging, polling)."""

from __future__ import annotations

import asyncio
import inspect
import warnings
from typing import Any

import pytest

from shardline import client_calls as calls
from shardline.client import AsyncClient, Client
from shardline.client_calls import Probe, Sleep, Unary
from shardline.errors import DeadlineExceeded, InvalidArgument
from shardline.v1 import coordinator_pb2

NOT_IN_THE_TABLE = {"close", "with_api_key"}  # the connection's, not calls of the Coordinator service
STREAM = {"generate", "chat"}  # stream=True is how the client reads the stream, not part of the request


def public(cls: type) -> dict[str, Any]:
    return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")
            and callable(getattr(cls, name))}


def test_both_clients_have_the_same_calls_with_the_same_signatures():
    sync, aio = public(Client), public(AsyncClient)
    assert sorted(sync) == sorted(aio), (set(sync) ^ set(aio))
    for name in sync:
        assert inspect.signature(sync[name]) == inspect.signature(aio[name]), name


def test_every_async_call_is_awaited_and_every_blocking_one_is_not():
    for name, method in public(AsyncClient).items():
        assert inspect.iscoroutinefunction(method) == (name != "with_api_key"), name
    for name, method in public(Client).items():
        assert not inspect.iscoroutinefunction(method), name


def test_every_call_of_the_clients_is_one_of_the_table_with_its_arguments():
    for name, method in public(Client).items():
        if name in NOT_IN_THE_TABLE:
            continue
        expected = [p for p in inspect.signature(method).parameters.values() if p.name != "self"
                    and not (name in STREAM and p.name == "stream")]
        assert list(inspect.signature(getattr(calls, name)).parameters.values()) == expected, name


def drive(steps: calls.Steps[Any], replies: list[Any]) -> tuple[list[calls.Step], Any]:
    """A call of the table run on canned replies: the steps it took and its value."""
    taken = [next(steps)]
    try:
        for reply in replies:
            taken.append(steps.send(reply))
    except StopIteration as done:
        return taken, done.value
    raise AssertionError(f"the call wants more than {len(replies)} replies: {taken}")


def test_a_bad_argument_is_refused_before_anything_is_sent():
    with pytest.raises(ValueError, match="pooling must be one of"):
        next(calls.embed(["x"], pooling="max"))
    with pytest.raises(InvalidArgument, match="item: a job line is a JSON object"):
        next(calls.submit_job(["not a dict"]))


def test_job_results_are_fetched_a_page_at_a_time():
    pages = [coordinator_pb2.GetJobResponse(results=[coordinator_pb2.JobItemResult(index=i, state="done")
                                                     for i in range(at, at + 2)], next_offset=next_offset)
             for at, next_offset in ((0, 2), (2, 0))]
    taken, results = drive(calls.job_results("job-1", timeout=3), pages)
    assert [(s.rpc, s.request.offset, s.timeout) for s in taken if isinstance(s, Unary)] == [
        ("GetJob", 0, 3), ("GetJob", 2, 3)]
    assert [r.index for r in results] == [0, 1, 2, 3]


def test_wait_ready_polls_until_serving_and_then_gives_up():
    taken, value = drive(calls.wait_ready(timeout=60), [False, None, True])
    assert [type(s) for s in taken] == [Probe, Sleep, Probe] and value is None
    with pytest.raises(DeadlineExceeded, match="not ready within 0 s"):
        drive(calls.wait_ready(timeout=0), [False])


def test_the_plaintext_key_warning_names_the_callers_line_for_both_clients():
    async def with_async_client() -> None:
        client = AsyncClient("192.0.2.1:50051", api_key="sl_key")
        await client.with_api_key("sl_other").close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = Client("192.0.2.1:50051", api_key="sl_key")
        client.with_api_key("sl_other").close()
        asyncio.run(with_async_client())
    assert [(w.filename, "in plaintext" in str(w.message)) for w in caught] == [(__file__, True)] * 4
