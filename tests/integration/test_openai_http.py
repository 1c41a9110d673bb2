"""The OpenAI-compatible HTTP gateway, driven by the official `openai` client (and httpx for raw cases) against a
real coordinator, workers and gateway on 127.0.0.1: the same answers as the SDK's for the same request, the
error statuses OpenAI's clients expect, API keys passed on, bounded bodies, and streaming that passes each
gRPC message on at once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import openai
import pytest

from coordinator.api.http_gateway import GatewaySettings
from coordinator.api.http_launch import settings_beside, start_beside, start_gateway
from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shard_worker.server import start_worker
from shardline.auth import hash_key, new_api_key
from shardline.client import Client
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

MODEL = "gw-llama"
BODY_LIMIT = 64 * 1024
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def models(store, minilm_store, tmp_path_factory):
    """A small random Llama that speaks text (SmolLM2's tokenizer and chat template, read from the built-in
    GGUF without importing its weights) and MiniLM for embeddings."""
    from transformers import AutoTokenizer

    from coordinator.store.importer import builtin_gguf, import_random, random_config

    if not store.has(MODEL):
        gguf = builtin_gguf()
        tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tokenizer_dir)
        import_random(store, MODEL, random_config("llama", hidden=64, layers=2, heads=4, vocab=49152,
                                                  positions=4096, bos_token_id=1, eos_token_id=2), seed=5,
                      tokenizer_dir=tokenizer_dir)
    return store


@pytest.fixture(scope="module")
def cluster(loop, models, parameters, tmp_path_factory):
    """A coordinator serving the Llama (2 stages) and MiniLM (1), with API keys, and its HTTP gateway on a free
    port, started as `coordinator serve` starts it (settings_beside); the gateway notes when each stream's
    first gRPC message reaches it."""
    key = new_api_key()
    keys = tmp_path_factory.mktemp("keys") / "api-keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "app", "role": "client", "sha256": hash_key(key)}]}))
    config = CoordinatorConfig(store=models.root, port=0, parameters_address=parameters.address, api_keys=keys,
                               deployments=[{"name": MODEL, "workers": 2}, {"name": "minilm", "workers": 1}],
                               heartbeat_timeout_ms=3_600_000, http_port=0, max_http_body_bytes=BODY_LIMIT,
                               jobs_dir=tmp_path_factory.mktemp("jobs"))
    coordinator = loop.run(start_coordinator(config))
    workers = [loop.run(start_worker()) for _ in range(3)]
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in workers:
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))
    first_messages: dict[str, float] = {}
    gateway = loop.run(start_gateway(settings_beside(config, coordinator.server.port),
                                     on_first=lambda id_: first_messages.__setitem__(id_, time.perf_counter())))
    sdk = Client(coordinator.address, api_key=key, timeout=60)
    sdk.wait_ready(timeout=120)
    yield {"coordinator": coordinator, "gateway": gateway, "url": gateway.url, "key": key, "sdk": sdk,
           "first": first_messages}
    sdk.close()
    loop.run(gateway.stop())
    for w in workers:
        loop.run(w.stop(0))
    loop.run(coordinator.stop())


@pytest.fixture(scope="module")
def oai(cluster):
    client = openai.OpenAI(base_url=cluster["url"], api_key=cluster["key"], max_retries=0, timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster["url"], headers={"authorization": f"Bearer {cluster['key']}"},
                      timeout=60) as client:
        yield client


def test_models_lists_every_deployment_and_finds_one(oai):
    listed = {m.id: m for m in oai.models.list().data}
    assert set(listed) == {MODEL, "minilm"}
    assert listed[MODEL].owned_by == "shardline" and listed[MODEL].model_extra["task"] == "generate"
    assert listed["minilm"].model_extra["task"] == "embed" and listed["minilm"].model_extra["ready"] is True
    assert oai.models.retrieve(f"{MODEL}@1").id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


@pytest.mark.smoke
def test_greedy_completion_equals_the_sdks_for_the_same_request(oai, cluster):
    reply = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={
        "ignore_eos": True})
    sdk = cluster["sdk"].generate(PROMPT, model=MODEL, max_tokens=12, temperature=0, ignore_eos=True)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and reply.model == MODEL
    (choice,) = reply.choices
    assert choice.text == sdk.text and len(sdk.token_ids) == 12 and choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (sdk.prompt_tokens, 12)
    assert reply.usage.total_tokens == sdk.prompt_tokens + 12
    ids = oai.completions.create(model=MODEL, prompt=sdk.token_ids[:5], max_tokens=6, temperature=0,
                                 stop=["\n\n\n"], seed=-3, extra_body={"ignore_eos": True})
    assert ids.choices[0].text == cluster["sdk"].generate(sdk.token_ids[:5], model=MODEL, max_tokens=6,
                                                          temperature=0, ignore_eos=True, stop=["\n\n\n"]).text


def test_chat_streamed_and_not_equals_the_sdks_chat(oai, cluster):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a city."}]
    sdk = cluster["sdk"].chat(messages, model=MODEL, max_tokens=10, temperature=0, ignore_eos=True)
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == sdk.text and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (sdk.prompt_tokens, 10)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk"
                                                                  for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == sdk.text
    assert len(chunks) >= 1 + 10  # one event per gRPC message (a token each), then the usage
    *pieces, usage = chunks
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (sdk.prompt_tokens,
                                                                                                  10)
    assert all(c.usage is None for c in pieces) and pieces[-1].choices[0].finish_reason == "length"


def test_streamed_completion_is_server_sent_events_ending_in_done(http, cluster):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in e for e in events)  # not asked for
    assert "".join(e["choices"][0]["text"] for e in events) == cluster["sdk"].generate(
        PROMPT, model=MODEL, max_tokens=5, temperature=0, ignore_eos=True).text


def test_a_completion_that_names_no_model_says_the_version_that_served_it(http):
    """Issue 34.11: not `"model": ""`; the name@version that served it (a request naming it reaches the same)."""
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    whole = http.post("/completions", json=body).json()
    with http.stream("POST", "/completions", json={**body, "stream": True}) as response:
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                  if line and line != "data: [DONE]"]
    assert whole["model"].startswith(f"{MODEL}@") and {e["model"] for e in events} == {whole["model"]}
    named = http.post("/completions", json={**body, "model": MODEL}).json()
    assert named["model"] == MODEL  # what was asked for, as OpenAI answers


def test_embeddings_equal_the_sdks_as_floats_and_as_base64(oai, http, cluster):
    texts = ["A man is eating food.", "The new movie is awesome.", "short"]
    expected = cluster["sdk"].embed(texts, model="minilm")
    reply = oai.embeddings.create(model="minilm", input=texts)  # the openai client asks for base64
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert got.shape == (3, 384) and np.array_equal(got, expected)
    assert reply.usage.prompt_tokens > 3 and reply.usage.total_tokens == reply.usage.prompt_tokens
    floats = http.post("/embeddings", json={"model": "minilm", "input": "short", "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], expected[2], atol=1e-7)
    refused = http.post("/embeddings", json={"model": "minilm", "input": "x", "dimensions": 8})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"temperature": -1}, "temperature", "temperature must be 0"),  # the coordinator's own check
    ({"max_tokens": 100_000}, "max_tokens", "max_tokens must be between 1 and"),
    ({"temperature": 1e300}, "temperature", "temperature must be 0"),  # float32 inf: the coordinator refuses it
    ({"max_tokens": "ten"}, "max_tokens", "max_tokens must be an integer, got a string"),
    ({"temperature": True}, "temperature", "must be a number, got a boolean"),
    ({"stop": [1]}, "stop", "stop must be a string or an array of strings"),
    ({"n": 17}, "n", "n must be between 1 and 16 (max_choices)"),
    ({"n": 2, "best_of": 1}, "best_of", "best_of (1) must be at least n (2)"),
    ({"logprobs": 21}, "logprobs", "logprobs must be between 0 and 20 (max_logprobs)"),
    ({"logprobs": 21, "echo": True}, "logprobs", "between 0 and 20 (max_logprobs)"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be between -2 and 2"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": 200}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"100000": 1}}, "logit_bias", "outside the model's vocabulary"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": [1, 2**40]}, "prompt", "prompt[1] must be a token id"),
    ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream: true"),
    # vLLM's extensions: honoured, or refused by name where the value would change the answer
    ({"skip_special_tokens": False}, "skip_special_tokens", "special tokens are always left out of the text"),
    ({"include_stop_str_in_output": True}, "include_stop_str_in_output", "left out of the text"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be in (0, 10]"),
    ({"min_p": 1.5}, "min_p", "min_p must be between 0 and 1"),
    ({"min_p": 10**400}, "min_p", "min_p is out of range"),
    ({"stop_token_ids": [1, "x"]}, "stop_token_ids", "stop_token_ids must be an array of token ids"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids", "stop_token_ids[0] is 1000000, outside the model's vocabulary"),
])
def test_an_invalid_parameter_is_400_naming_it(http, body, param, words):
    error = error_of(http.post("/completions", json={"model": MODEL, "prompt": PROMPT, **body}), 400)
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_probes_answer_without_a_key_and_say_whether_it_serves(cluster):
    """/health, /ping and /version, as vLLM, SGLang and TGI serve them (load generators such as guidellm ask
    /health first); they need no key, everything else still does."""
    import shardline

    root = cluster["url"].removesuffix("/v1")
    for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")):
        answer = httpx.request(method, root + path, timeout=30)
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}, (path, answer.text)
    assert httpx.get(root + "/version", timeout=30).json() == {"version": shardline.__version__}
    assert httpx.get(root + "/v1/models", timeout=30).status_code == 401


def test_a_gateway_before_a_ready_coordinator_is_503_on_health(loop):
    from tests.e2e.test_join_and_generate import free_port

    gateway = loop.run(start_gateway(GatewaySettings(f"127.0.0.1:{free_port()}", port=0, timeout_s=10)))
    try:
        answer = httpx.get(gateway.url.removesuffix("/v1") + "/health", timeout=30)
        assert answer.status_code == 503 and "does not answer" in answer.json()["reason"]
    finally:
        loop.run(gateway.stop())


@pytest.mark.parametrize("path, body", [
    ("/completions", {"prompt": PROMPT, "max_tokens": 6}),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 6}),
])
def test_a_load_generators_requests_are_served_with_usage_on_every_chunk(http, cluster, path, body):
    """The bodies guidellm sends (stream_options.continuous_usage_stats, stop null, ignore_eos, and the neutral
    values of vLLM's extensions): served, and every chunk says the usage so far."""
    sent = {"model": MODEL, **body, "stream": True, "stop": None, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "skip_special_tokens": True,
            "spaces_between_special_tokens": True, "include_stop_str_in_output": False, "min_p": 0,
            "repetition_penalty": 1}
    with http.stream("POST", path, json=sent) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                  if line and line != "data: [DONE]"]
    chunks, last = events[:-1], events[-1]
    assert [e["usage"]["completion_tokens"] for e in chunks] == list(range(1, 7))
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert prompt_tokens > 0 and all(e["usage"]["prompt_tokens"] == prompt_tokens for e in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
               for e in events)


def test_stop_token_ids_end_the_stream_ignore_eos_or_not(cluster, http):
    sdk = cluster["sdk"]
    free = sdk.generate(PROMPT, model=MODEL, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    stop = free[5]
    cut = free.index(stop)
    stopped = sdk.generate(PROMPT, model=MODEL, max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    assert stopped.token_ids == free[:cut] and stopped.finish_reason == "stop"
    later = sdk.generate(PROMPT, model=MODEL, max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop],
                         min_tokens=cut + 1)  # before min_tokens it is just a token
    assert later.token_ids[:cut + 1] == free[:cut + 1]
    over_http = http.post("/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                "ignore_eos": True, "stop_token_ids": [stop]}).json()
    assert over_http["choices"][0]["finish_reason"] == "stop"
    assert over_http["usage"]["completion_tokens"] == cut


def test_chat_fields_it_cannot_honour_are_400_and_harmless_ones_are_ignored(oai, http):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=messages, logprobs=True, top_logprobs=50)
    assert err.value.param == "top_logprobs" and "max_logprobs" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=messages, top_logprobs=2)
    assert err.value.param == "top_logprobs" and "logprobs: true" in err.value.message
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    assert err.value.param == "tools"
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *messages]
    ok = oai.chat.completions.create(model=MODEL, messages=parts, max_tokens=2, user="u1", metadata={"a": "b"})
    assert ok.usage.completion_tokens >= 1
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    error = error_of(http.post("/chat/completions", json={"model": MODEL, "messages": image}), 400)
    assert error["param"] == "messages" and "image_url" in error["message"]


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"model": "gw-llama", "prompt": ', "not valid JSON"),
    (b'{"model": "gw-llama", "prompt": "x", "temperature": NaN}', "NaN is not a JSON value"),
    (b'["a list"]', "must be a JSON object, got an array"),
    (b"\xff\xfe\x00", "not"),
])
def test_malformed_json_is_400(http, raw, words):
    error = error_of(http.post("/completions", content=raw, headers={"content-type": "application/json"}), 400)
    assert words in error["message"]


def test_an_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert "no-such-model" in err.value.message


def test_a_body_over_the_limit_is_413_unread_and_the_gateway_goes_on(http, oai):
    big = {"model": MODEL, "prompt": "word " * BODY_LIMIT}
    error = error_of(http.post("/completions", json=big), 413)
    assert error["code"] == "request_too_large" and str(BODY_LIMIT) in error["message"]

    def chunked():  # no declared length: the gateway stops reading at the limit
        yield b'{"model": "gw-llama", "prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 1):
            yield b"x" * 1024

    assert http.post("/completions", content=chunked()).status_code == 413
    assert oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


def test_at_capacity_is_429_and_a_stream_abandoned_midway_frees_its_place(oai, cluster):
    coordinator = cluster["coordinator"]
    scheduler = next(r.scheduler.policy for r in coordinator.fleet.replicas if r.name.startswith(MODEL))
    limits = scheduler.max_active, scheduler.max_queued
    scheduler.max_active, scheduler.max_queued = 1, 0  # configuration, as max_active_streams would set it
    try:
        stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2000, stream=True,
                                        extra_body={"ignore_eos": True})
        next(iter(stream))  # it holds the only place
        with pytest.raises(openai.RateLimitError) as err:
            oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 429 and err.value.code == "capacity_exceeded"
        assert "at capacity" in err.value.message
        stream.close()  # the HTTP client goes away: the gateway cancels the gRPC stream
        deadline = time.monotonic() + 10
        while (coordinator.server.servicer.active_sessions or scheduler.active) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert coordinator.server.servicer.active_sessions == 0 and scheduler.active == 0  # out of the batch
        assert oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
    finally:
        scheduler.max_active, scheduler.max_queued = limits


def test_a_caller_that_gives_up_on_a_whole_completion_leaves_the_batch(cluster):
    """Not streamed: the handler is waiting for the whole text when the client goes away; the gateway notices
    the disconnect and cancels the generation (2000 tokens would take the tiny model ~14 s)."""
    coordinator = cluster["coordinator"]
    scheduler = next(r.scheduler.policy for r in coordinator.fleet.replicas if r.name.startswith(MODEL))
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster['url']}/completions", json=body, timeout=httpx.Timeout(30, read=1.0),
                   headers={"authorization": f"Bearer {cluster['key']}"})
    gone = time.monotonic()
    while (coordinator.server.servicer.active_sessions or scheduler.active) and time.monotonic() < gone + 5:
        time.sleep(0.05)
    assert coordinator.server.servicer.active_sessions == 0 and scheduler.active == 0


def test_the_bearer_key_goes_on_to_the_coordinator(cluster, http):
    wrong = openai.OpenAI(base_url=cluster["url"], api_key="sl_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401 and "not valid here" in err.value.message
    bare = httpx.post(f"{cluster['url']}/completions", json={"model": MODEL, "prompt": PROMPT}, timeout=30)
    assert "requires an API key" in error_of(bare, 401)["message"]
    basic = httpx.get(f"{cluster['url']}/models", headers={"authorization": "Basic abc"}, timeout=30)
    assert error_of(basic, 401)["code"] == "invalid_api_key"
    assert error_of(http.get("/no/such/path"), 404)["message"].startswith("no such endpoint")


def raw_post(url: str, headers: str, length: int = 4_000_000) -> tuple[bytes, float]:
    """Send a POST's headers alone (their Content-Length promises a body never sent); what comes back within
    3 s, and how long it took."""
    host, _, port = url.split("//")[1].split("/")[0].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        began = time.perf_counter()
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {length}\r\n{headers}\r\n".encode())
        answer = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer, time.perf_counter() - began


def test_a_caller_without_a_valid_key_is_refused_before_a_byte_of_its_body_is_read(cluster):
    """The key is judged from the headers: a keyless or unknown-key caller hears 401 at once and the connection
    closes, though its promised 4 MB body never came (and is over the limit: the key comes first); a keyed
    caller's request (of an allowed size) waits for its body."""
    for headers in ("", "authorization: Bearer sl_not-a-key\r\n"):
        answer, took = raw_post(cluster["url"], headers)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"connection: close" in answer.lower() and took < 2.0, (answer[:300], took)
        assert b"sl_not-a-key" not in answer  # the key is never echoed
    answer, took = raw_post(cluster["url"], f"authorization: Bearer {cluster['key']}\r\n", BODY_LIMIT // 2)
    assert answer == b"" and took >= 2.9, (answer[:200], took)  # admitted: the gateway waits for the body


def seconds_until(condition, timeout: float = 10.0) -> float:
    began = time.perf_counter()
    while not condition():
        assert time.perf_counter() - began < timeout, "not within the timeout"
        time.sleep(0.05)
    return time.perf_counter() - began


def test_a_revoked_key_is_refused_by_the_gateway_within_a_second_or_two(cluster):
    def status_of(headers: dict[str, str]) -> int:
        return httpx.get(f"{cluster['url']}/models", headers=headers, timeout=10).status_code

    keys_file = cluster["coordinator"].fleet.config.api_keys
    before = keys_file.read_text()
    second = new_api_key()
    entries = json.loads(before)
    entries["keys"].append({"name": "second", "role": "client", "sha256": hash_key(second)})
    try:
        keys_file.write_text(json.dumps(entries))
        headers = {"authorization": f"Bearer {second}"}
        assert seconds_until(lambda: status_of(headers) == 200) < 2.5  # the file is read again within a second
        keys_file.write_text(before)
        assert seconds_until(lambda: status_of(headers) == 401) < 2.5
        refused = httpx.get(f"{cluster['url']}/models", headers=headers, timeout=10)
        assert "not valid here" in error_of(refused, 401)["message"]  # the gateway's door, not the coordinator's
    finally:
        keys_file.write_text(before)


def test_beside_the_coordinator_the_gateway_runs_on_a_thread_and_loop_of_its_own(loop, cluster):
    """As `serve` and `launch` start it (start_beside): not on the coordinator's event loop; it serves, and its
    stop ends its thread and frees its port."""
    config = cluster["coordinator"].fleet.config
    gateway = loop.run(start_beside(config, cluster["coordinator"].server.port))
    assert gateway is not None
    try:
        assert gateway.thread.thread.is_alive() and gateway.thread.loop is not loop.loop
        listed = httpx.get(f"{gateway.url}/models", headers={"authorization": f"Bearer {cluster['key']}"}, timeout=30)
        assert listed.status_code == 200 and MODEL in listed.text
        assert raw_post(gateway.url, "")[0].startswith(b"HTTP/1.1 401")  # judged there before the body too
    finally:
        loop.run(gateway.stop())
    assert not gateway.thread.thread.is_alive()
    with socket.socket() as probe:  # free again, for a server as ours binds (TIME_WAIT is no obstacle)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((gateway.host, gateway.port))
        probe.listen()


def test_the_callers_request_id_and_trace_context_go_on_to_the_coordinator(http, cluster, caplog):
    """`x-request-id` is quoted by the coordinator's request log line and echoed on the response (a stream's
    and an error's too); `traceparent` makes the coordinator's span a child of the caller's."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shardline import tracing

    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    try:
        with caplog.at_level("INFO", logger="shardline.requests"):
            reply = http.post("/completions", json=body, headers={
                "x-request-id": "order-42/a", "traceparent": f"00-{trace_id:032x}-{parent_id:016x}-01"})
            streamed = http.post("/completions", json={**body, "stream": True},
                                 headers={"x-request-id": "with space"})
            missing = http.post("/completions", json={**body, "model": "no-such"}, headers={"x-request-id": "e1"})
    finally:
        tracing.shutdown()
        tracing.off()
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "order-42/a"
    assert streamed.status_code == 200 and streamed.headers["x-request-id"] == "with space"
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "e1"
    assert "x-request-id" not in http.post("/completions", json=body).headers
    lines = [r.getMessage() for r in caplog.records if r.name == "shardline.requests"]
    assert any(" client_id=order-42/a kind=generate " in line for line in lines), lines
    assert any(' client_id="with space" kind=generate ' in line for line in lines), lines  # quoted: one field
    assert any(" client_id=e1 kind=generate " in line and "outcome=NOT_FOUND" in line for line in lines), lines
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "shardline.Generate"
               and s.context.trace_id == trace_id]
    assert span.parent.span_id == parent_id
    too_long = http.post("/completions", json=body, headers={"x-request-id": "x" * 129})
    assert error_of(too_long, 400)["code"] == "invalid_request_id" and "128" in error_of(too_long, 400)["message"]


def test_grpc_callers_give_their_request_id_as_metadata(cluster, caplog):
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(cluster["coordinator"].address))
    auth = ("authorization", f"Bearer {cluster['key']}")
    request = coordinator_pb2.GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=2)
    with caplog.at_level("INFO", logger="shardline.requests"):
        list(stub.Generate(request, metadata=[auth, ("x-request-id", "grpc-7")], timeout=60))
    assert any(" client_id=grpc-7 " in r.getMessage() for r in caplog.records if r.name == "shardline.requests")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, metadata=[auth, ("x-request-id", "y" * 200)], timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-request-id" in err.value.details()


def test_the_first_event_leaves_within_20_ms_of_the_first_grpc_message(http, cluster):
    """Each stream's first gRPC message is timestamped inside the gateway (the same clock as this thread's);
    the client's receipt of the first SSE event is within 20 ms of it (the median of 5, on a shared 2-core
    machine), while the whole stream lasts far longer: the gateway passes messages on, it does not buffer."""
    delays, spans = [], []
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stream": True,
            "ignore_eos": True}
    for _ in range(5):
        with http.stream("POST", "/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            received = time.perf_counter()
            rest = [line for line in lines if line]
            ended = time.perf_counter()
        assert rest[-1] == "data: [DONE]" and len(rest) >= 48
        delays.append(received - cluster["first"][json.loads(first.removeprefix("data: "))["id"]])
        spans.append(ended - received)
    print(f"first event after the first gRPC message: {[round(d * 1000, 2) for d in delays]} ms")
    assert statistics.median(delays) < 0.020, delays
    assert statistics.median(spans) > 5 * statistics.median(delays), (spans, delays)


def test_a_stream_that_fails_midway_ends_with_an_error_event(loop, cluster):
    """After the first event the status has gone out: a deadline passed mid-stream is an error event (which the
    openai client raises), not a silent end; before the first, it would be a 504."""
    settings = GatewaySettings(cluster["coordinator"].address, port=0, timeout_s=1.0)
    gateway = loop.run(start_gateway(settings))
    try:
        client = openai.OpenAI(base_url=gateway.url, api_key=cluster["key"], max_retries=0)
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2000, stream=True,
                                           extra_body={"ignore_eos": True})
        texts = []
        with pytest.raises(openai.APIError) as err:
            for chunk in stream:
                texts.append(chunk.choices[0].text)
        assert texts and err.value.code == "deadline_exceeded"
    finally:
        loop.run(gateway.stop())


def test_a_coordinator_out_of_reach_is_503_without_its_address(loop):
    from tests.e2e.test_join_and_generate import free_port

    target = f"127.0.0.1:{free_port()}"
    gateway = loop.run(start_gateway(GatewaySettings(target, port=0, timeout_s=10)))
    try:
        for method, path, body in (("GET", "/models", None), ("POST", "/completions", {"prompt": "x"})):
            error = error_of(httpx.request(method, f"{gateway.url}{path}", json=body, timeout=30), 503)
            assert error["code"] == "unavailable" and "cannot reach" in error["message"]
            assert target not in error["message"]
    finally:
        loop.run(gateway.stop())


def test_under_tls_it_serves_https_with_the_node_certificate_and_reaches_the_coordinator_over_tls(
        loop, models, tmp_path):
    """With the cluster's certificates the gateway beside the coordinator serves HTTPS (node certificate) and
    calls the coordinator over TLS, where client certificates are required: it presents the node's, and passes
    the caller's key on (a certificate's role comes from the keys file, and the node's has none)."""
    from coordinator.cli.certs import create_ca, create_node
    from shardline.auth import hash_key, new_api_key

    create_ca(tmp_path)
    create_node(tmp_path, ["localhost", "127.0.0.1"])
    key = new_api_key()
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "app", "role": "client", "sha256": hash_key(key)}]}))
    config = CoordinatorConfig(store=models.root, model=MODEL, port=0, cluster_port=0, certs_dir=tmp_path,
                               client_certs="required", api_keys=keys, http_port=0, jobs_dir=tmp_path / "jobs")
    coordinator = loop.run(start_coordinator(config))
    gateway = loop.run(start_gateway(settings_beside(config, coordinator.server.port)))
    try:
        assert gateway.url.startswith("https://")
        # a client without a certificate from the CA (TLS 1.3: refused once the client thinks the handshake done)
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"{gateway.url}/models", verify=str(tmp_path / "ca.crt"), timeout=10)
        node = httpx.create_ssl_context(verify=str(tmp_path / "ca.crt"))
        node.load_cert_chain(tmp_path / "node.crt", tmp_path / "node.key")
        assert httpx.get(f"{gateway.url}/models", verify=node, timeout=30).status_code == 401  # no key
        listed = httpx.get(f"{gateway.url}/models", verify=node, timeout=30,
                           headers={"authorization": f"Bearer {key}"}).json()
        assert [(m["id"], m["ready"]) for m in listed["data"]] == [(MODEL, False)]  # no workers: not ready
    finally:
        loop.run(gateway.stop())
        loop.run(coordinator.stop())


@pytest.mark.e2e
def test_coordinator_http_runs_alone_in_front_of_a_coordinator(cluster):
    """`coordinator http --endpoint` as a process: it serves the coordinator's models, passes the key on, and
    stops on SIGTERM, freeing its port."""
    endpoint = cluster["coordinator"].address
    process = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "http", "--endpoint", endpoint, "--port",
                                "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        said = []
        while "OpenAI-compatible HTTP API on " not in (line := process.stdout.readline()):
            said.append(line)
            assert line, "".join(said)
        url = re.search(r"(http://\S+/v1)", line).group(1)
        listed = httpx.get(f"{url}/models", headers={"authorization": f"Bearer {cluster['key']}"}, timeout=30)
        assert listed.status_code == 200 and {m["id"] for m in listed.json()["data"]} == {MODEL, "minilm"}
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/models", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def reference(models):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models.path(MODEL), dtype=torch.float32).eval()


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(http, reference):
    """lm-evaluation-harness's `local-completions` body for a log-likelihood (token ids, echo, logprobs 1,
    max_tokens 1): one entry per prompt token and one for the generated token, equal to transformers'
    log_softmax of the same logits."""
    import torch

    ids = [1, 504, 3575, 282, 4649, 314, 253, 1345, 30]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1}
    answer = http.post("/completions", json=body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    for pos in range(1, len(ids) + 1):
        row = ref[pos - 1]
        token = ids[pos] if pos < len(ids) else int(torch.argmax(row))
        assert abs(lp["token_logprobs"][pos] - row[token]) < 1e-4
        (best,) = lp["top_logprobs"][pos].values()
        assert abs(best - row.max()) < 1e-4
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # greedy: lm-eval's is_greedy holds
    assert choice["text"].startswith("".join(lp["tokens"][:len(ids)]))  # the prompt's text, echoed
    assert lp["text_offset"][1] == len(lp["tokens"][0])


def test_chat_logprobs_through_the_official_client(oai, cluster):
    messages = [{"role": "user", "content": "Name a colour."}]
    answer = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"ignore_eos": True})
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 6
    sdk = cluster["sdk"].chat(messages, model=MODEL, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in sdk.logprobs], abs=1e-6)
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == c.logprob  # greedy: the likeliest
        assert bytes(c.bytes).decode() == c.token
    streamed = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
    tokens = [c.token for chunk in streamed for choice in chunk.choices if choice.logprobs
              for c in choice.logprobs.content]
    assert tokens == [c.token for c in content]


def test_penalties_and_bias_over_http_are_the_sdks(http, cluster):
    sdk = cluster["sdk"]
    plain = sdk.generate(PROMPT, model=MODEL, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    bias = {plain[0]: -100.0}
    params = {"repetition_penalty": 1.5, "frequency_penalty": 1.0, "presence_penalty": 0.5, "min_p": 0.1}
    want = sdk.generate(PROMPT, model=MODEL, max_tokens=16, temperature=0, ignore_eos=True, logit_bias=bias,
                        **params).token_ids
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(k): v for k, v in bias.items()}, **params}
    answer = http.post("/completions", json=body).json()
    assert answer["usage"]["completion_tokens"] == 16
    assert want[0] != plain[0] and want != plain  # the bias and the penalties changed the answer
    again = sdk.generate(PROMPT, model=MODEL, max_tokens=16, temperature=0, ignore_eos=True, logit_bias=bias,
                         logprobs=0, **params)
    assert again.token_ids == want and [t.token_id for t in again.logprobs] == want
    assert answer["choices"][0]["text"] == again.text


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
          "properties": {"city": {"type": "string", "maxLength": 10}, "rank": {"type": "integer", "minimum": 1,
                                                                            "maximum": 9}}}


def test_response_format_and_structured_outputs_through_the_official_client(oai):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        answer = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A city?"}],
                                             max_tokens=200, temperature=0.8, seed=seed, response_format=fmt)
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
    picked = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=4,
                                    extra_body={"structured_outputs": {"choice": ["Paris", "Lyon (Rhône)"]}})
    assert picked.choices[0].text in ("Paris", "Lyon (Rhône)")
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema", "json_schema": {"schema": {"type": 7}}})
    assert err.value.param == "response_format" and "cannot be compiled" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=PROMPT, extra_body={"structured_outputs": {"regex": "(?=x)"}})
    assert err.value.param == "structured_outputs"


def test_n_choices_and_best_of_through_the_official_client(oai, cluster):
    sdk = cluster["sdk"]
    singles = [sdk.generate(PROMPT, model=MODEL, max_tokens=8, temperature=1.0, seed=30 + i, ignore_eos=True).text
               for i in range(3)]
    several = oai.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=30,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == singles
    assert several.usage.completion_tokens == 24
    streamed = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                           max_tokens=6, temperature=1.0, seed=5, stream=True,
                                           extra_body={"ignore_eos": True})
    texts = ["", ""]
    finished = set()
    for event in streamed:
        for choice in event.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    whole = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                        max_tokens=6, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    assert texts == [c.message.content for c in whole.choices] and finished == {0, 1} and texts[0] != texts[1]
    best = oai.completions.create(model=MODEL, prompt=PROMPT, n=2, best_of=4, max_tokens=8, temperature=1.0, seed=30,
                                  logprobs=0, extra_body={"ignore_eos": True})
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in best.choices]
    assert len(best.choices) == 2 and means[0] >= means[1]
    four = sdk.generate(PROMPT, model=MODEL, n=4, max_tokens=8, temperature=1.0, seed=30, ignore_eos=True, logprobs=0)
    ranked = sorted((sum(t.logprob for t in c.logprobs[:8]) / 8 for c in four.choices), reverse=True)
    assert means == pytest.approx(ranked[:2], abs=1e-5)  # the best two of the same four
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=PROMPT, n=3, best_of=2)
    assert err.value.param == "best_of"
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=PROMPT, n=40)
    assert err.value.param == "n" and "max_choices" in err.value.message
