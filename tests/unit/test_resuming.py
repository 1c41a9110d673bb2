"""When the SDK resumes a broken Generate stream, and when it raises (shardline.client_calls.Resuming, pure:
the errors are RpcError values as grpc makes them, with or without the server's trailing metadata)."""

from __future__ import annotations

import grpc
import pytest

from shardline.client_calls import Resuming, Stream
from shardline.client_types import GenerateResult
from shardline.errors import ANSWERED, InvalidArgument, ResourceExhausted, Unavailable
from shardline.v1 import coordinator_pb2


class Status(grpc.RpcError):
    """A call's end as grpc reports it: a code, details, and trailing metadata (the server's, if it sent it)."""

    def __init__(self, code: grpc.StatusCode, details: str, answered: bool = False) -> None:
        self._code, self._details, self._trailing = code, details, (ANSWERED,) if answered else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


BROKEN = Status(grpc.StatusCode.UNAVAILABLE, "Socket closed")
LOADING = Status(grpc.StatusCode.UNAVAILABLE, "model 'm' is loading", answered=True)


def stream(seed: bool = False, model: str = "m@1", tokens: tuple[int, ...] = (5, 6),
           timeout: float = 30) -> Resuming:
    request = coordinator_pb2.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=10)
    resuming = Resuming(Stream(request), GenerateResult(), timeout)
    first = coordinator_pb2.GenerateResponse(token_ids=list(tokens), model=model)
    if seed:
        first.seed = 77
    resuming.result.add(first)
    return resuming


def test_a_broken_stream_resumes_with_what_it_received_its_version_and_its_seed():
    resuming = stream(seed=True)
    assert resuming.after(BROKEN) > 0 and resuming.result.resumed == 1
    again = resuming.request()
    assert list(again.resume_token_ids) == [5, 6] and again.model == "m@1" and again.seed == 77
    assert list(again.prompt_token_ids) == [1, 2] and again.max_tokens == 10
    assert resuming.after(LOADING) > 0  # resuming: the coordinator's own "not ready yet" is waited through
    resuming.resumed()
    assert resuming.broke == ""


def test_what_is_not_a_break_of_a_resumable_stream_is_raised_at_once():
    with pytest.raises(Unavailable, match="loading"):  # the coordinator's answer, not a break
        stream().after(LOADING)
    with pytest.raises(Unavailable, match="Socket closed"):  # a coordinator too old to resume names no version
        stream(model="").after(BROKEN)
    with pytest.raises(Unavailable):  # nothing received yet: as before, the caller's to retry
        Resuming(Stream(coordinator_pb2.GenerateRequest()), GenerateResult(), 30).after(BROKEN)
    with pytest.raises(InvalidArgument, match="bad"):
        stream().after(Status(grpc.StatusCode.INVALID_ARGUMENT, "bad", answered=True))


def test_a_break_after_the_last_message_keeps_the_whole_result():
    resuming = stream()
    last = coordinator_pb2.GenerateResponse(token_ids=[7], finish_reason=coordinator_pb2.FINISH_REASON_LENGTH)
    resuming.result.add(last)
    assert resuming.after(BROKEN) is None and resuming.result.token_ids == [5, 6, 7]


def test_a_resume_past_its_deadline_is_unavailable_saying_why():
    resuming = stream(timeout=0.01)
    with pytest.raises(Unavailable, match="broke after 2 tokens and could not resume within 0 s: Socket closed"):
        resuming.after(BROKEN)
    resuming = Resuming(Stream(coordinator_pb2.GenerateRequest()), GenerateResult(), 30, window_s=0.01)
    resuming.result.add(coordinator_pb2.GenerateResponse(token_ids=[1], model="m@1"))
    with pytest.raises(Unavailable, match="within 0 s"):  # the break's window, sooner than the deadline
        resuming.after(BROKEN)
    resuming = stream()
    resuming.after(BROKEN)
    with pytest.raises(Unavailable, match="could not resume"):
        resuming.after(Status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


def test_resuming_waits_through_a_quota_that_still_counts_the_broken_stream():
    resuming = stream()
    resuming.after(BROKEN)
    over = Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "key 'k' has 2 calls open", answered=True)
    assert resuming.after(over) > 0
    with pytest.raises(ResourceExhausted):  # not resuming: the coordinator's answer, raised at once
        stream().after(over)
