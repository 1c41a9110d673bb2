"""Keys cannot see each other through the caches (issue 28.3): with per-key caches (the default), key B's
first request for a prompt key A already sent is a miss, never `cached`; with `cache_scope = "shared"` it is a
hit. Real coordinator with API keys on port 0, in-process workers."""

from __future__ import annotations

import json
import sqlite3
import time

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shardline.auth import hash_key, new_api_key
from shardline.client import Client
from shardline.errors import NotFound, Unauthenticated
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

PROMPT = [5, 17, 99, 3, 42, 8, 7]
GREEDY = dict(max_tokens=4, temperature=0)


@pytest.mark.parametrize("scope, b_sees_a", [("key", False), ("shared", True)])
def test_a_key_never_hears_cached_for_another_keys_prompt(loop, store, parameters, workers, tmp_path, scope, b_sees_a):
    keys = {name: new_api_key() for name in ("a", "b")}
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"name": n, "role": "client", "sha256": hash_key(k)}
                                              for n, k in keys.items()]}))
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0, http=False,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                               api_keys=keys_file, result_cache_mb=1, cache_scope=scope, jobs_dir=tmp_path)
    coordinator = loop.run(start_coordinator(config))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in workers(2):
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))
    try:
        with Client(coordinator.address, api_key=keys["a"], timeout=120) as a, \
                Client(coordinator.address, api_key=keys["b"], timeout=120) as b:
            a.wait_ready(timeout=120)
            first = a.generate(PROMPT, **GREEDY)
            assert not first.cached and a.generate(PROMPT, **GREEDY).cached  # A's own answer is A's to reuse
            theirs = b.generate(PROMPT, **GREEDY)
            assert theirs.cached is b_sees_a and theirs.token_ids == first.token_ids
            assert b.generate(PROMPT, **GREEDY).cached  # and B's own, once B sent it
    finally:
        loop.run(coordinator.stop())


def test_a_revoked_keys_open_kserve_stream_is_refused_at_its_next_request(loop, store, parameters, workers,
                                                                          tmp_path):
    import queue
    import time

    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    key = new_api_key()
    keys_file = tmp_path / "keys.json"
    entries = {"keys": [{"name": "app", "role": "client", "sha256": hash_key(key)}]}
    keys_file.write_text(json.dumps(entries))
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0, http=False,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                               api_keys=keys_file, jobs_dir=tmp_path)
    coordinator = loop.run(start_coordinator(config))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in workers(2):
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))
    outgoing: queue.Queue = queue.Queue()

    def request(i: int) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="tiny-llama", id=str(i))
        r.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
        r.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(2)
        return r

    def requests():
        while (item := outgoing.get()) is not None:
            yield item

    try:
        with Client(coordinator.address, api_key=key, timeout=120) as client:
            client.wait_ready(timeout=120)
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(coordinator.address))
        responses = stub.ModelStreamInfer(requests(), metadata=[("authorization", f"Bearer {key}")], timeout=60)
        outgoing.put(request(1))
        first = next(responses)  # admitted (tiny-llama has no tokenizer: the model's own answer, not the key's)
        assert first.infer_response.id == "1" and "tokenizer" in first.error_message
        keys_file.write_text(json.dumps({"keys": []}))  # revoked, while the stream stays open
        revoked = time.monotonic()
        while True:
            outgoing.put(request(2))
            answer = next(responses)
            if "no longer valid" in answer.error_message:
                break
            assert time.monotonic() - revoked < 1.5, "the revoked key was still served"
        assert time.monotonic() - revoked < 1.5
        outgoing.put(None)
    finally:
        loop.run(coordinator.stop())


def test_a_key_over_its_quota_is_refused_at_once_and_others_are_not(loop, store, parameters, workers, tmp_path):
    """Quotas per key (issue 28.2), from the keys file: `busy` may have 2 calls open and start 50 a second;
    its third stream is refused with RESOURCE_EXHAUSTED naming the quota (HTTP: 429 with Retry-After), while
    `calm` (no quota) is served; once busy's streams end, it is served again. `rated` may start one every 2 s."""
    import httpx

    from coordinator.api.http_launch import settings_beside, start_gateway
    from shardline.errors import ResourceExhausted

    keys = {name: new_api_key() for name in ("busy", "calm", "rated")}
    quota = {"busy": {"max_streams": 2, "requests_per_s": 50}, "calm": {}, "rated": {"requests_per_s": 0.5}}
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"name": n, "role": "client", "sha256": hash_key(k), **quota[n]}
                                              for n, k in keys.items()]}))
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0, http_port=0,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                               api_keys=keys_file, jobs_dir=tmp_path)
    coordinator = loop.run(start_coordinator(config))
    gateway = loop.run(start_gateway(settings_beside(config, coordinator.server.port)))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in workers(2):
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))
    try:
        with Client(coordinator.address, api_key=keys["busy"], timeout=120) as busy, \
                Client(coordinator.address, api_key=keys["calm"], timeout=120) as calm, \
                Client(coordinator.address, api_key=keys["rated"], timeout=120) as rated:
            busy.wait_ready(timeout=120)
            long = dict(max_tokens=200, ignore_eos=True, temperature=0)
            streams = [busy.generate(PROMPT, stream=True, **long) for _ in range(2)]
            for s in streams:
                next(s)  # both open, running
            with pytest.raises(ResourceExhausted, match=r"key 'busy' has 2 calls open, its quota \(max_streams 2"):
                busy.generate(PROMPT, **GREEDY)
            answer = httpx.post(f"{gateway.url}/completions", headers={"authorization": f"Bearer {keys['busy']}"},
                                json={"prompt": "x", "max_tokens": 2}, timeout=60)
            assert answer.status_code == 429 and answer.headers["retry-after"] == "1", answer.text
            assert "max_streams" in answer.json()["error"]["message"]
            assert calm.generate(PROMPT, **GREEDY).completion_tokens == 4  # another key: not held back
            for s in streams:
                assert sum(len(c.token_ids) for c in s) > 0  # read to the end: they finish
            assert busy.generate(PROMPT, **GREEDY).completion_tokens == 4  # room again
            rated.generate(PROMPT, **GREEDY)  # one, then the next only 2 s later
            with pytest.raises(ResourceExhausted, match=r"quota of 0.5 requests per second .*retry in \d"):
                rated.generate(PROMPT, **GREEDY)
    finally:
        loop.run(gateway.stop())
        loop.run(coordinator.stop())


def test_a_new_key_given_a_revoked_keys_name_inherits_none_of_its_jobs(loop, store, tmp_path):
    """Jobs belong to the key (an id from its hash), not to its name: "app" revoked, then a new "app" key,
    sees none of the old key's jobs; an admin still does. No workers: a job is accepted and listed before it
    runs."""
    old, new, admin = new_api_key(), new_api_key(), new_api_key()
    keys_file = tmp_path / "keys.json"

    def keys(app: str) -> None:
        keys_file.write_text(json.dumps({"keys": [{"name": "app", "role": "client", "sha256": hash_key(app)},
                                                  {"name": "ops", "role": "admin", "sha256": hash_key(admin)}]}))

    keys(old)
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0, http=False,
                               api_keys=keys_file, jobs_dir=tmp_path / "jobs")
    coordinator = loop.run(start_coordinator(config))
    try:
        with Client(coordinator.address, api_key=old, timeout=30) as app:
            job_id = app.submit_job([{"prompt_token_ids": PROMPT, "max_tokens": 2}])
            assert [j.job_id for j in app.list_jobs()] == [job_id]
        keys(new)  # "app" revoked and made again: a new key of the same name
        with Client(coordinator.address, api_key=new, timeout=30) as app:
            deadline = time.monotonic() + 5
            while True:  # the file is read again within a second of the change
                try:
                    jobs = app.list_jobs()
                    break
                except Unauthenticated:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert jobs == []
            with pytest.raises(NotFound):
                app.get_job(job_id)
        with Client(coordinator.address, api_key=old, timeout=30) as gone, pytest.raises(Unauthenticated):
            gone.list_jobs()
        with Client(coordinator.address, api_key=admin, timeout=30) as ops:
            assert job_id in [j.job_id for j in ops.list_jobs()]
        # a job stored before jobs were owned by key ids (its owner the key's name) stays its name's after an upgrade
        with sqlite3.connect(tmp_path / "jobs" / "jobs.sqlite3") as db:
            db.execute("UPDATE jobs SET owner = 'app' WHERE id = ?", (job_id,))
        with Client(coordinator.address, api_key=new, timeout=30) as app:
            assert [j.job_id for j in app.list_jobs()] == [job_id] and app.get_job(job_id).job_id == job_id
    finally:
        loop.run(coordinator.stop())
