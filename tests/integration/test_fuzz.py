"""Garbage on the wire: thousands of random and mutated byte messages on every RPC of every service (the
coordinator's Coordinator and WorkerRegistry, a shard worker's ShardWorker, the parameter service, and the
health and reflection services beside them), sent raw on real servers on port 0.

Bytes that do not parse are INVALID_ARGUMENT naming the message type, with one WARNING line (rate-limited),
never UNKNOWN with a traceback; bytes that happen to parse get a domain answer. No call hangs (a deadline
each), every server answers a normal request afterwards, and the process's memory stays flat.
"""

from __future__ import annotations

import logging
import random
import time

import grpc
import psutil
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shardline.server import CHANNEL_OPTIONS
from shardline.v1 import coordinator_pb2, parameters_pb2, worker_pb2

DEADLINE_S = 5.0
ROUNDS = 400  # messages per RPC after the warm-up round
WARMUP = 40
ADDRESS = "127.0.0.1:1"  # nothing listens there: an address a parsed message may name is refused at once

FD = pb_descriptor.FieldDescriptor
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def sample(desc: pb_descriptor.Descriptor, depth: int = 0):
    """A message with every field set (nested ones two levels deep): a seed for mutations."""
    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        repeated = f.is_repeated
        if f.message_type is not None:
            if depth >= 2 or f.message_type.GetOptions().map_entry:
                continue
            sub = sample(f.message_type, depth + 1)
            (getattr(msg, f.name).add() if repeated else getattr(msg, f.name)).CopyFrom(sub)
            continue
        value = {FD.TYPE_STRING: ADDRESS, FD.TYPE_BYTES: b"\x01\x02\x03", FD.TYPE_BOOL: True,
                 FD.TYPE_FLOAT: 0.5, FD.TYPE_DOUBLE: 0.5}.get(f.type, 1)
        if f.type == FD.TYPE_ENUM:
            value = f.enum_type.values[-1].number
        if repeated:
            getattr(msg, f.name).append(value)
        else:
            setattr(msg, f.name, value)
    return msg


CRAFTED = [
    b"\x0a\xff\xff\xff\xff\x0f",          # a length far past the end
    b"\x0b" * 5000,                       # groups nested past any recursion limit
    b"\x0a\x80" + b"\x80" * 20,           # a varint that never ends
    b"\x0a\x03\xff\xfe\xfd",              # a string field that is not UTF-8
    b"\x07",                              # wire type 7 does not exist
    b"\x00\x00",                          # field number 0
    b"\xfa\xff\xff\xff\x0f\x00",          # the largest field number, length-delimited, empty
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 2 and b:
            del b[rng.randrange(len(b))]
        elif op == 3 and b:
            del b[rng.randrange(len(b)):]
        elif op == 4 and b:
            b[rng.randrange(len(b))] = rng.choice((0x80, 0xff, 0x0a, 0x0b, 0x12))
        else:
            at = rng.randrange(len(b) + 1)
            b[at:at] = b[:rng.randrange(len(b) + 1)]
    return bytes(b)


def garbage(rng: random.Random, seed: bytes, i: int) -> bytes:
    if i < len(CRAFTED):
        return CRAFTED[i]
    if i % 2:
        return rng.randbytes(rng.choice((rng.randrange(1, 16), rng.randrange(16, 512))))
    return mutate(rng, seed)


class Rpc:
    def __init__(self, channel: grpc.Channel, method: pb_descriptor.MethodDescriptor) -> None:
        self.name = f"/{method.containing_service.full_name}/{method.name}"
        self.client_streaming, self.server_streaming = method.client_streaming, method.server_streaming
        kind = ("stream" if self.client_streaming else "unary") + "_" + ("stream" if self.server_streaming else "unary")
        self.call = getattr(channel, kind)(self.name, request_serializer=None, response_deserializer=None)
        self.seed = sample(method.input_type).SerializeToString()

    def send(self, messages: list[bytes]) -> grpc.StatusCode:
        request = iter(messages) if self.client_streaming else messages[0]
        try:
            if self.server_streaming:
                for _ in self.call(request, timeout=DEADLINE_S):
                    pass
            else:
                self.call(request, timeout=DEADLINE_S)
        except grpc.RpcError as err:
            return self.check(err.code(), err.details() or "")
        return grpc.StatusCode.OK

    def check(self, code: grpc.StatusCode, details: str) -> grpc.StatusCode:
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED), (
            self.name, code, details)
        assert "Traceback" not in details and "Unexpected" not in details, (self.name, details)
        return code


@pytest.fixture(scope="module")
def servers(loop, store, parameters):
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=10_000, port=0,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000)
    coordinator = loop.run(start_coordinator(config))
    from shard_worker.server import start_worker

    worker = loop.run(start_worker())
    yield {"coordinator": coordinator.address, "worker": worker.address, "parameters": parameters.address}
    loop.run(worker.stop(0))
    loop.run(coordinator.stop())


def rpcs(servers) -> list[Rpc]:
    services = {
        "coordinator": [coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
                        coordinator_pb2.DESCRIPTOR.services_by_name["WorkerRegistry"]],
        "worker": [worker_pb2.DESCRIPTOR.services_by_name["ShardWorker"]],
        "parameters": [parameters_pb2.DESCRIPTOR.services_by_name["Parameters"]],
    }
    found = []
    for role, address in servers.items():
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        for service in services[role]:
            found += [Rpc(channel, m) for m in service.methods]
        found.append(Rpc(channel, HEALTH.methods_by_name["Check"]))  # Watch streams until cancelled
        reflection = grpc.insecure_channel(address)
        found.append(_reflection_rpc(reflection))
    return found


def _reflection_rpc(channel: grpc.Channel) -> Rpc:
    from grpc_reflection.v1alpha import reflection_pb2

    return Rpc(channel, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].methods[0])


def barrage(targets: list[Rpc], rng: random.Random, start: int, count: int) -> dict[grpc.StatusCode, int]:
    codes: dict[grpc.StatusCode, int] = {}
    for i in range(start, start + count):
        for rpc in targets:
            message = garbage(rng, rpc.seed, i)
            messages = [rpc.seed, message] if rpc.client_streaming and i % 3 == 0 else [message]
            code = rpc.send(messages)
            codes[code] = codes.get(code, 0) + 1
    return codes


def test_garbage_bytes_on_every_rpc_are_invalid_argument_and_nothing_breaks(servers, caplog):
    targets = rpcs(servers)
    assert len(targets) >= 20, [t.name for t in targets]
    rng = random.Random(1234)
    process = psutil.Process()
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    barrage(targets, rng, 0, WARMUP)
    rss_before = process.memory_info().rss
    codes = barrage(targets, rng, WARMUP, ROUNDS)
    rss_after = process.memory_info().rss
    elapsed = time.monotonic() - started
    sent = (WARMUP + ROUNDS) * len(targets)
    assert sent >= 5000
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > sent // 4, codes
    assert rss_after - rss_before < 50 * 2**20, (rss_before, rss_after)
    print(f"{sent} messages on {len(targets)} RPCs in {elapsed:.1f} s; RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB; {codes}")
    # no traceback, no "unexpected" error; the malformed ones in one line each, rate-limited
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage()[:300] for r in errors[:5]]
    lines = [r for r in caplog.records if r.name == "shardline.malformed"]
    assert lines and all("\n" not in r.getMessage() for r in lines)
    assert len(lines) <= len(targets) * (elapsed / 1.0 + 2), (len(lines), elapsed)

    # every server still serves a normal request
    for address in servers.values():
        channel = grpc.insecure_channel(address)
        health = channel.unary_unary("/grpc.health.v1.Health/Check",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        assert health(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S).status in (1, 2)
    from shardline.v1 import coordinator_pb2_grpc, parameters_pb2_grpc, worker_pb2_grpc

    coordinator = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(servers["coordinator"]))
    (model,) = coordinator.ListModels(coordinator_pb2.ListModelsRequest(), timeout=DEADLINE_S).models
    assert model.name == "tiny-llama"
    worker = worker_pb2_grpc.ShardWorkerStub(grpc.insecure_channel(servers["worker"]))
    assert worker.GetStatus(worker_pb2.GetStatusRequest(), timeout=DEADLINE_S).sessions == 0
    params = parameters_pb2_grpc.ParametersStub(grpc.insecure_channel(servers["parameters"]))
    assert "tiny-llama" in params.ListStoredModels(parameters_pb2.ListStoredModelsRequest(), timeout=DEADLINE_S).models
