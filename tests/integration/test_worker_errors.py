"""Bad input gets the right status and a message naming the field; the stream keeps serving others."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.codec import encode_tensor, from_numpy
from shardline.v1 import tensor_pb2, worker_pb2
from tests.helpers import Chain, error_of, load, seq, worker_stub

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture()
def middle(workers, parameters):
    """A loaded two-worker chain [0, 3) + [3, 6) of tiny-llama; returns (first, second) servers."""
    first, second = workers(2)
    load(first.address, "tiny-llama", 0, 3, parameters.address)
    load(second.address, "tiny-llama", 3, 6, parameters.address)
    return first, second


def hidden_request(step_id, sequences, hidden, start_layer=3):
    return worker_pb2.ForwardRequest(step_id=step_id, sequences=sequences, hidden=hidden, start_layer=start_layer)


def good_hidden(n):
    return encode_tensor(from_numpy(np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)))


@pytest.mark.parametrize("bad, code, field", [
    (lambda: good_hidden(2), INVALID, "hidden.shape"),  # 2 rows for 3 tokens
    (lambda: encode_tensor(from_numpy(np.zeros((3, 65), np.float32))), INVALID, "hidden.shape"),
    (lambda: encode_tensor(from_numpy(np.zeros((3, 64), np.int64))), INVALID, "hidden.dtype int64"),  # not a wire dtype
    (lambda: tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 64], data=b"\0" * 100), INVALID,
     "hidden.data"),
])
def test_bad_hidden_is_refused_and_stream_goes_on(middle, bad, code, field):
    _, second = middle
    requests = [
        hidden_request(1, [seq("bad", 0, 3)], bad()),
        hidden_request(2, [seq("good", 0, 3)], good_hidden(3)),
    ]
    responses = sorted(worker_stub(second.address).Forward(iter(requests), timeout=60), key=lambda r: r.step_id)
    assert responses[0].error.code == code
    assert field in responses[0].error.message
    assert not responses[1].HasField("error")
    assert len(responses[1].token_ids) == 1


def test_unknown_session_and_gap_in_positions(middle):
    first, second = middle
    chain = Chain([first.address, second.address])
    chain.greedy("known", [1, 2, 3], 2)  # cache now holds 4 positions
    responses = chain.send([
        chain.request([seq("nobody", 5, 1)], [7], step_id=1),
        chain.request([seq("known", 9, 1)], [7], step_id=2),
        chain.request([seq("known", 4, 1)], [7], step_id=3),
    ])
    assert error_of(responses[0]).code == NOT_FOUND and "'nobody'" in error_of(responses[0]).message
    assert error_of(responses[1]).code == INVALID and "start_position 9" in error_of(responses[1]).message
    assert not error_of(responses[2]).code and len(responses[2].token_ids) == 1


def test_a_bad_sequence_fails_alone_and_its_neighbours_in_the_batch_go_on(middle):
    """One sequence's fault (an unknown session, a token outside the vocabulary, poison sampling values)
    fails that sequence only: the others of the same message get their tokens, as they do alone."""
    first, second = middle
    chain = Chain([first.address, second.address])
    alone = chain.greedy("alone", [1, 2, 3], 1) + chain.greedy("alone-2", [4, 5, 6], 1)
    response = chain.step([seq("nobody", 5, 1), seq("good", 0, 3), seq("vocab", 0, 2),
                           seq("nan", 0, 1, temperature=float("nan")),
                           seq("tiny", 0, 3, temperature=1e-39, top_p=1e-30)],
                          [7, 1, 2, 3, 1, 5000, 4, 4, 5, 6])
    assert not response.HasField("error")
    failed = {e.session_id: e.error for e in response.sequence_errors}
    assert failed["nobody"].code == NOT_FOUND and failed["vocab"].code == INVALID and "5000" in failed["vocab"].message
    assert failed["nan"].code == INVALID and "sampling" in failed["nan"].message
    assert list(response.token_ids) == alone  # "good", and "tiny" (a denormal temperature is greedy)


def test_route_and_layer_mismatch(middle):
    first, second = middle
    stub = worker_stub(second.address)
    wrong_layer = hidden_request(1, [seq("s", 0, 3)], good_hidden(3), start_layer=2)
    (response,) = stub.Forward(iter([wrong_layer]), timeout=60)
    assert response.error.code == INVALID and "start_layer 2" in response.error.message
    short_route = worker_pb2.ForwardRequest(step_id=1, sequences=[seq("s", 0, 3)], token_ids=[1, 2, 3])
    (response,) = worker_stub(first.address).Forward(iter([short_route]), timeout=60)
    assert response.error.code == INVALID and "route" in response.error.message


def test_token_ids_outside_vocabulary(middle):
    first, second = middle
    chain = Chain([first.address, second.address])
    response = chain.step([seq("v", 0, 2)], [1, 5000])
    assert error_of(response).code == INVALID and "5000" in error_of(response).message


def test_end_session_frees_cache(middle):
    first, second = middle
    chain = Chain([first.address, second.address])
    chain.greedy("ending", [1, 2, 3], 3)
    for server in (first, second):
        stub = worker_stub(server.address)
        before = stub.GetStatus(worker_pb2.GetStatusRequest())
        assert before.sessions == 1 and before.kv_cache_bytes > 0
        assert stub.EndSession(worker_pb2.EndSessionRequest(session_ids=["ending"])).ended == 1
        after = stub.GetStatus(worker_pb2.GetStatusRequest())
        assert after.sessions == 0 and after.kv_cache_bytes == 0


def test_a_late_step_for_an_ended_session_does_not_bring_it_back(middle):
    """Replay gives a session a new id, so an id once ended is never used again: a step for it that arrives
    late (held by a link that stalled) is refused, even at position 0, and no cache is created."""
    first, second = middle
    chain = Chain([first.address, second.address])
    for server in (first, second):
        worker_stub(server.address).EndSession(worker_pb2.EndSessionRequest(session_ids=["late"]))
    response = chain.step([seq("late", 0, 3)], [1, 2, 3])
    assert error_of(response).code == NOT_FOUND and "has ended" in error_of(response).message
    assert all(worker_stub(s.address).GetStatus(worker_pb2.GetStatusRequest()).sessions == 0 for s in (first, second))


def test_load_shard_bad_range_and_unreachable_parameters(workers, parameters):
    (worker,) = workers(1)
    with pytest.raises(grpc.RpcError) as err:
        load(worker.address, "tiny-llama", 4, 9, parameters.address)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[4, 9)" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        load(worker.address, "tiny-llama", 3, 3, parameters.address)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        load(worker.address, "no-such-model", 0, 1, parameters.address)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        load(worker.address, "tiny-llama", 0, 1, "127.0.0.1:1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "127.0.0.1:1" in err.value.details()


def test_forward_before_load_is_failed_precondition(workers):
    (worker,) = workers(1)
    request = worker_pb2.ForwardRequest(step_id=1, sequences=[seq("s", 0, 1)], token_ids=[1])
    (response,) = worker_stub(worker.address).Forward(iter([request]), timeout=60)
    assert response.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(worker.address))
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
