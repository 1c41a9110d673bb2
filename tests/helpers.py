"""Test helpers: an event loop on a thread for real grpc.aio servers, and a sync chain client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import grpc

from shardline.codec import decode_tensor, encode_tensor, from_numpy, to_numpy
from shardline.server import CHANNEL_OPTIONS
from shardline.v1 import worker_pb2, worker_pb2_grpc

T = TypeVar("T")


class LoopThread:
    """An asyncio loop on a daemon thread, so sync tests can host async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def worker_stub(address: str) -> worker_pb2_grpc.ShardWorkerStub:
    return worker_pb2_grpc.ShardWorkerStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))


def load(address: str, model: str, start: int, end: int, parameters: str, dtype: int = 0, **kv: Any) -> list[Any]:
    """LoadShard and return every progress message (raises grpc.RpcError on failure); `kv`: the request's
    step and KV settings (max_step_tokens, kv_block_tokens, session_ttl_ms, ...)."""
    request = worker_pb2.LoadShardRequest(model=model, start_layer=start, end_layer=end,
                                          parameters_address=parameters, dtype=dtype, **kv)
    return list(worker_stub(address).LoadShard(request, timeout=300))


def seq(session: str, start: int, count: int, **sampling: Any) -> worker_pb2.SequenceSlice:
    return worker_pb2.SequenceSlice(session_id=session, start_position=start, num_tokens=count,
                                    sampling=worker_pb2.SamplingParams(**sampling))


class Chain:
    """Drives a chain of workers the way the coordinator will: token ids into the first, a route on."""

    def __init__(self, addresses: list[str], layer0: int = 0) -> None:
        self.addresses = addresses
        self.stub = worker_stub(addresses[0])

    def request(self, sequences: Iterable[worker_pb2.SequenceSlice], token_ids: list[int],
                output: int = worker_pb2.OUTPUT_KIND_TOKENS, step_id: int = 1) -> worker_pb2.ForwardRequest:
        return worker_pb2.ForwardRequest(step_id=step_id, sequences=list(sequences), token_ids=token_ids,
                                         start_layer=0, route=self.addresses[1:], output=output)

    def send(self, requests: list[worker_pb2.ForwardRequest]) -> list[worker_pb2.ForwardResponse]:
        """Send several requests on one stream; responses come back sorted by step_id."""
        responses = list(self.stub.Forward(iter(requests), timeout=120))
        return sorted(responses, key=lambda r: r.step_id)

    def step(self, sequences: list[worker_pb2.SequenceSlice], token_ids: list[int],
             output: int = worker_pb2.OUTPUT_KIND_TOKENS) -> worker_pb2.ForwardResponse:
        (response,) = self.send([self.request(sequences, token_ids, output)])
        return response

    def logits(self, session: str, start: int, token_ids: list[int]) -> Any:
        response = self.step([seq(session, start, len(token_ids))], token_ids, worker_pb2.OUTPUT_KIND_LOGITS)
        assert not response.HasField("error") and not response.sequence_errors, error_of(response).message
        return to_numpy(decode_tensor(response.tensor))

    def greedy(self, session: str, prompt: list[int], steps: int) -> list[int]:
        response = self.step([seq(session, 0, len(prompt))], prompt)
        assert not response.HasField("error") and not response.sequence_errors, error_of(response).message
        out = [response.token_ids[0]]
        for _ in range(steps - 1):
            response = self.step([seq(session, len(prompt) + len(out) - 1, 1)], [out[-1]])
            assert not response.HasField("error") and not response.sequence_errors, error_of(response).message
            out.append(response.token_ids[0])
        return out


__all__ = ["Chain", "LoopThread", "decode_tensor", "encode_tensor", "from_numpy", "load", "seq", "to_numpy",
           "worker_stub"]


def error_of(response: worker_pb2.ForwardResponse) -> Any:
    """The response's error: the message's own, or else its first sequence's (an empty ErrorStatus if none)."""
    if response.HasField("error") or not response.sequence_errors:
        return response.error
    return response.sequence_errors[0].error
