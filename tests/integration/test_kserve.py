"""The KServe v2 gRPC API on the coordinator's port, through tritonclient.grpc unchanged (and its own generated
stubs for requests tritonclient would not build): health and metadata, embeddings equal to the SDK's,
streamed and whole generations equal to the SDK's greedy text, every bad input answered INVALID_ARGUMENT
naming it (in a stream: an error response, and the stream goes on), and API keys."""

from __future__ import annotations

import json
import queue
import time
from functools import partial

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shardline.auth import hash_key, new_api_key
from shardline.client import Client
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

PROMPT = "The three primary colors are"
TEXTS = ["A man is eating food.", "Sharding a model across machines lets it serve more users.", "short", ""]
GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def kserve_store(smollm2_store, minilm_store):
    """A small random Llama that speaks through SmolLM2's tokenizer (fast, with text), and MiniLM."""
    from coordinator.store.importer import import_random, random_config

    if not smollm2_store.has("tok"):
        import_random(smollm2_store, "tok", random_config("llama", hidden=64, layers=4, heads=4, kv_heads=2,
                                                          vocab=49152, intermediate=128, positions=4096),
                      seed=5, tokenizer_dir=smollm2_store.path("smollm2"))
    return smollm2_store


@pytest.fixture(scope="module")
def cluster(loop, kserve_store, parameters, pool):
    config = CoordinatorConfig(store=kserve_store.root, workers=2, port=0, parameters_address=parameters.address,
                               heartbeat_timeout_ms=3_600_000, max_tokens_limit=4000,
                               deployments=[dict(name="tok"), dict(name="minilm")])
    coordinator = loop.run(start_coordinator(config))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for server in pool(4):
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=server.address,
                                                                      memory_budget_bytes=2**30))
    with Client(coordinator.address, timeout=120) as sdk:
        sdk.wait_ready(timeout=120)
        yield coordinator, sdk
    loop.run(coordinator.stop())


@pytest.fixture()
def client(cluster):
    with triton.InferenceServerClient(cluster[0].address) as c:
        yield c


def text_input(text: str, shape=(1,)) -> triton.InferInput:
    t = triton.InferInput("text_input", list(shape), "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object).reshape(shape))
    return t


def scalar(name: str, value, datatype: str, dtype) -> triton.InferInput:
    t = triton.InferInput(name, [1], datatype)
    t.set_data_from_numpy(np.array([value], dtype=dtype))
    return t


def greedy_inputs(prompt: str = PROMPT) -> list[triton.InferInput]:
    return [text_input(prompt), scalar("max_tokens", 12, "INT32", np.int32),
            scalar("temperature", 0.0, "FP32", np.float32), scalar("ignore_eos", True, "BOOL", bool)]


class Stream:
    """tritonclient's stream with its responses on a queue."""

    def __init__(self, client: triton.InferenceServerClient, **kw) -> None:
        self.client, self.responses = client, queue.Queue()
        client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), self.responses), **kw)

    def next(self):
        return self.responses.get(timeout=120)

    def until_final(self) -> list:
        """A request's results up to the one marked triton_final_response."""
        results = []
        while True:
            result, error = self.next()
            assert error is None, error
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results

    def close(self) -> None:
        self.client.stop_stream()


def text_of(result) -> str:
    out = result.as_numpy("text_output")
    return "" if out is None else b"".join(out.reshape(-1)).decode()


def test_health_and_metadata(cluster, client):
    assert client.is_server_live() and client.is_server_ready()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(cluster[0].address))
    check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
    assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert client.is_model_ready("tok") and client.is_model_ready("minilm", "1") and client.is_model_ready("tok@1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("tok", "9")
    server = client.get_server_metadata()
    assert server.name == "shardline" and server.version and list(server.extensions) == ["parameters"]
    tok = client.get_model_metadata("tok")
    assert tok.name == "tok" and list(tok.versions) == ["1"]
    inputs = {i.name: (i.datatype, list(i.shape)) for i in tok.inputs}
    assert inputs["text_input"] == ("BYTES", [1]) and inputs["max_tokens"] == ("INT32", [1])
    assert {"temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "sampling_parameters"} <= set(inputs)
    assert [(o.name, o.datatype, list(o.shape)) for o in tok.outputs] == [("text_output", "BYTES", [-1])]
    minilm = client.get_model_metadata("minilm", "1")
    assert [(i.name, i.datatype, list(i.shape)) for i in minilm.inputs][0] == ("text_input", "BYTES", [-1])
    assert [(o.name, o.datatype, list(o.shape)) for o in minilm.outputs] == [("embeddings", "FP32", [-1, 384])]
    for name, version in (("nope", ""), ("tok", "9")):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(name, version)
        assert err.value.status() == "StatusCode.NOT_FOUND", err.value
        assert err.value.message().startswith("Request for unknown model: ")


def test_embeddings_equal_the_sdks(cluster, client, caplog):
    _, sdk = cluster
    expected = sdk.embed(TEXTS, model="minilm")
    t = triton.InferInput("text_input", [len(TEXTS)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in TEXTS], dtype=object))
    with caplog.at_level("INFO", logger="shardline.requests"):
        result = client.infer("minilm", [t], model_version="1", request_id="e1")
    assert any(" client_id=e1 kind=infer " in r.getMessage() for r in caplog.records), "the request log quotes the id"
    vectors = result.as_numpy("embeddings")
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    assert np.array_equal(vectors, expected)
    response = result.get_response()
    assert response.id == "e1" and response.model_version == "1" and response.parameters["tokens"].int64_param > 0
    cls = sdk.embed(TEXTS[:2], model="minilm", pooling="cls", normalize=False)
    t = triton.InferInput("text_input", [2, 1], "BYTES")  # a batch of one-element rows, as batched configs send
    t.set_data_from_numpy(np.array([[s.encode()] for s in TEXTS[:2]], dtype=object))
    extra = [scalar("pooling", b"cls", "BYTES", object), scalar("normalize", False, "BOOL", bool)]
    assert np.array_equal(client.infer("minilm", [t, *extra]).as_numpy("embeddings"), cls)
    # a text over the model's positions: refused unless the request asks for truncation, then as the SDK cuts it
    long = triton.InferInput("text_input", [1], "BYTES")
    long.set_data_from_numpy(np.array(["word " * 600], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        client.infer("minilm", [long])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "input 'truncate'" in err.value.message()
    cut = client.infer("minilm", [long, scalar("truncate", True, "BOOL", bool)]).as_numpy("embeddings")
    assert np.array_equal(cut, sdk.embed(["word " * 600], model="minilm", truncate=True))


@pytest.mark.smoke
def test_streamed_and_whole_generations_equal_the_sdks_greedy_text(cluster, client, caplog):
    _, sdk = cluster
    expected = sdk.generate(PROMPT, model="tok", **GREEDY)
    assert expected.text and expected.completion_tokens == 12
    stream = Stream(client)
    try:
        stream.client.async_stream_infer("tok", greedy_inputs(), request_id="s1", parameters={"stream": True})
        results = stream.until_final()
        assert len(results) == 12  # one response per piece
        assert "".join(text_of(r) for r in results) == expected.text
        assert all(r.get_response().id == "s1" for r in results)
        last = results[-1].get_response().parameters
        assert last["finish_reason"].string_param == "length" and last["completion_tokens"].int64_param == 12
        # not asked to stream: one response, the whole text, final
        stream.client.async_stream_infer("tok", greedy_inputs(), request_id="s2")
        (whole,) = stream.until_final()
        assert text_of(whole) == expected.text
        # `stream` as an input, the sampling values as JSON, and an empty final response asked for
        sampling = scalar("sampling_parameters", json.dumps(GREEDY).encode(), "BYTES", object)
        stream.client.async_stream_infer("tok", [text_input(PROMPT), sampling, scalar("stream", True, "BOOL", bool)],
                                         enable_empty_final_response=True)
        results = stream.until_final()
        assert len(results) == 13 and results[-1].as_numpy("text_output") is None
        assert not any(r.get_response().parameters["triton_final_response"].bool_param for r in results[:-1])
        assert "".join(text_of(r) for r in results) == expected.text
    finally:
        stream.close()
    with caplog.at_level("INFO", logger="shardline.requests"):
        result = client.infer("tok", greedy_inputs(), request_id="w1")
    assert any(" client_id=w1 kind=generate " in r.getMessage() for r in caplog.records)
    assert text_of(result) == expected.text and result.get_response().id == "w1"
    assert result.as_numpy("text_output").shape == (1,)
    # [1, 1], a batch of one as TensorRT-LLM clients send it, is answered in the same shape
    batched = [text_input(PROMPT, (1, 1)), *greedy_inputs()[1:]]
    assert client.infer("tok", batched).as_numpy("text_output").shape == (1, 1)


def test_logprobs_penalties_and_bias_in_sampling_parameters_equal_the_sdks(cluster, client):
    """Named as vLLM's SamplingParams names them (Triton's vLLM backend passes them on); the log probabilities come
    back in an output of their own, as JSON."""
    _, sdk = cluster
    params = dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2, min_p=0.05)
    expected = sdk.generate(PROMPT, model="tok", **GREEDY, logprobs=2, logit_bias={13: -100.0}, **params)
    sampling = json.dumps({**GREEDY, **params, "logprobs": 2, "logit_bias": {"13": -100}}).encode()
    result = client.infer("tok", [text_input(PROMPT), scalar("sampling_parameters", sampling, "BYTES", object)])
    assert text_of(result) == expected.text
    scores = json.loads(result.as_numpy("logprobs")[0])
    assert [t["token_id"] for t in scores] == expected.token_ids
    assert [t["logprob"] for t in scores] == pytest.approx([t.logprob for t in expected.logprobs], abs=1e-6)
    # the model's own likeliest (the penalties changed which one was picked, not these)
    assert all(len(t["top"]) == 2 and 0 >= t["top"][0]["logprob"] >= t["top"][1]["logprob"] for t in scores)
    unpenalized = sdk.generate(PROMPT, model="tok", max_tokens=1, temperature=0, logprobs=2)
    assert scores[0]["top"][0]["token_id"] == unpenalized.logprobs[0].top[0][0]  # the model's own, unchanged
    plain = sdk.generate(PROMPT, model="tok", **GREEDY)
    assert plain.text != expected.text  # the penalties changed the answer
    with pytest.raises(InferenceServerException, match="logit_bias must be an object of token id"):
        client.infer("tok", [text_input(PROMPT), scalar("sampling_parameters", b'{"logit_bias": [1]}', "BYTES",
                                                        object)])


def test_requests_on_one_stream_run_together_and_a_cancelled_stream_frees_them(cluster, client):
    coordinator, sdk = cluster
    prompts = {"a": PROMPT, "b": "Once upon a time", "c": "def add(a, b):"}
    expected = {k: sdk.generate(p, model="tok", **GREEDY).text for k, p in prompts.items()}
    stream = Stream(client)
    try:
        for k, p in prompts.items():
            stream.client.async_stream_infer("tok", greedy_inputs(p), request_id=k, parameters={"stream": True})
        texts, finals = dict.fromkeys(prompts, ""), set()
        while finals != set(prompts):
            result, error = stream.next()
            assert error is None, error
            response = result.get_response()
            texts[response.id] += text_of(result)
            if response.parameters["triton_final_response"].bool_param:
                finals.add(response.id)
        assert texts == expected
    finally:
        stream.close()
    # a stream cancelled mid-generation: its generations stop and leave the batch
    stream = Stream(client)
    long = [text_input(PROMPT), scalar("max_tokens", 4000, "INT32", np.int32), scalar("ignore_eos", True, "BOOL", bool)]
    for _ in range(2):
        stream.client.async_stream_infer("tok", long, parameters={"stream": True})
    assert stream.next()[1] is None  # generating: 4000 tokens take far longer than the wait below
    assert sdk.cluster_status().active_sessions == 2
    client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 5
    while (active := sdk.cluster_status().active_sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert active == 0
    assert sdk.generate(PROMPT, model="tok", max_tokens=2).completion_tokens == 2


def test_a_cluster_at_capacity_is_unavailable_as_tritons_full_queue(cluster, client):
    coordinator, sdk = cluster
    scheduler = next(r.scheduler.policy for r in coordinator.fleet.replicas if r.name.startswith("tok"))
    limits = scheduler.max_active, scheduler.max_queued
    scheduler.max_active, scheduler.max_queued = 1, 0  # configuration, as max_active_streams would set it
    stream = Stream(client)
    try:
        long = [text_input(PROMPT), scalar("max_tokens", 4000, "INT32", np.int32),
                scalar("ignore_eos", True, "BOOL", bool)]
        stream.client.async_stream_infer("tok", long, parameters={"stream": True})
        assert stream.next()[1] is None  # it holds the only place
        with pytest.raises(InferenceServerException) as err:
            client.infer("tok", greedy_inputs())
        assert err.value.status() == "StatusCode.UNAVAILABLE" and "at capacity" in err.value.message()
    finally:
        client.stop_stream(cancel_requests=True)
        scheduler.max_active, scheduler.max_queued = limits
    deadline = time.monotonic() + 5
    while sdk.cluster_status().active_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sdk.generate(PROMPT, model="tok", max_tokens=2).completion_tokens == 2


def request(model="tok", **fields) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(model_name=model, **fields)


def tensor(name, datatype, shape, **contents) -> service_pb2.ModelInferRequest.InferInputTensor:
    t = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if contents:
        t.contents.CopyFrom(service_pb2.InferTensorContents(**contents))
    return t


def raw_bytes(*values: bytes) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


PROMPT_RAW = raw_bytes(PROMPT.encode())
TEXT = tensor("text_input", "BYTES", [1])

# (request, a word the message must hold): each answered INVALID_ARGUMENT
BAD = [
    (request(inputs=[TEXT, tensor("max_tokens", "FP32", [1])], raw_input_contents=[PROMPT_RAW, b"\0\0\0\0"]),
     "'max_tokens' has datatype 'FP32'"),
    (request(inputs=[tensor("text_input", "BYTES", [2])], raw_input_contents=[PROMPT_RAW * 2]),
     "'text_input' has shape [2]"),
    (request(inputs=[tensor("text_input", "BYTES", [1, 1, 1])], raw_input_contents=[PROMPT_RAW]),
     "'text_input' has shape [1, 1, 1]"),
    (request(inputs=[TEXT, tensor("foo", "INT32", [1])], raw_input_contents=[PROMPT_RAW, b"\0" * 4]),
     "unexpected input 'foo'"),
    (request(inputs=[tensor("max_tokens", "INT32", [1])], raw_input_contents=[b"\x05\0\0\0"]),
     "'text_input' is missing"),
    (request(inputs=[TEXT], raw_input_contents=[b"\xff\xff\xff\x7fhi"]), "'text_input': element 0 declares"),
    (request(inputs=[TEXT], raw_input_contents=[b"\x05\0"]), "'text_input': raw contents end inside"),
    (request(inputs=[TEXT], raw_input_contents=[PROMPT_RAW * 2]), "'text_input': raw contents hold more"),
    (request(inputs=[TEXT], raw_input_contents=[raw_bytes(b"\xff\xfe")]), "'text_input': element 0 is not valid UTF-8"),
    (request(inputs=[TEXT, TEXT], raw_input_contents=[PROMPT_RAW, PROMPT_RAW]), "'text_input' is given twice"),
    (request(inputs=[TEXT, tensor("max_tokens", "INT32", [1])], raw_input_contents=[PROMPT_RAW]),
     "raw_input_contents holds 1 entries for 2 inputs"),
    (request(inputs=[tensor("text_input", "BYTES", [1], bytes_contents=[b"x"])], raw_input_contents=[PROMPT_RAW]),
     "'text_input' has contents"),
    (request(inputs=[tensor("text_input", "BYTES", [1], int_contents=[1])]), "'text_input' holds 0 values"),
    (request(inputs=[TEXT, tensor("max_tokens", "INT32", [1])], raw_input_contents=[PROMPT_RAW, b"\0\0"]),
     "'max_tokens': raw contents are 2 bytes"),
    (request(inputs=[TEXT, tensor("sampling_parameters", "BYTES", [1])],
             raw_input_contents=[PROMPT_RAW, raw_bytes(b"{not json")]), "sampling_parameters is not JSON"),
    (request(inputs=[TEXT, tensor("sampling_parameters", "BYTES", [1])],
             raw_input_contents=[PROMPT_RAW, raw_bytes(b'{"n": 2}')]), "sampling_parameters: unknown key 'n'"),
    (request(inputs=[TEXT, tensor("sampling_parameters", "BYTES", [1])],
             raw_input_contents=[PROMPT_RAW, raw_bytes(b'{"logit_bias": {"--5": 1}}')]),
     "sampling_parameters.logit_bias must be an object of token id"),
    (request(inputs=[TEXT, tensor("sampling_parameters", "BYTES", [1])],
             raw_input_contents=[PROMPT_RAW, raw_bytes(b'{"logit_bias": {"5": 1e400}}')]),
     "sampling_parameters.logit_bias must be an object of token id"),
    (request(inputs=[TEXT, tensor("sampling_parameters", "BYTES", [1])],
             raw_input_contents=[PROMPT_RAW, raw_bytes(b'{"max_tokens": "5"}')]), "sampling_parameters.max_tokens"),
    (request(inputs=[TEXT, tensor("sampling_parameters", "BYTES", [1])],
             raw_input_contents=[PROMPT_RAW, raw_bytes(b"[" * 50_000)]), "sampling_parameters is not JSON"),
    (request(inputs=[TEXT, tensor("seed", "INT64", [1])], raw_input_contents=[PROMPT_RAW, b"\xff" * 8]),
     "seed '-1' does not fit"),
    (request(inputs=[TEXT], raw_input_contents=[PROMPT_RAW],
             outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
     "unexpected output 'logits'"),
    (request(inputs=[TEXT], raw_input_contents=[PROMPT_RAW], parameters={"stream": service_pb2.InferParameter(
        string_param="yes")}), "parameter 'stream' must be a bool"),
    # values the native API refuses, with its message
    (request(inputs=[TEXT, tensor("max_tokens", "INT32", [1])], raw_input_contents=[PROMPT_RAW, b"\0" * 4]),
     "max_tokens must be between 1 and 4000 (max_tokens_limit), got 0"),
    (request(inputs=[tensor("text_input", "BYTES", [1], bytes_contents=[PROMPT.encode()]),
                     tensor("temperature", "FP32", [1], fp32_contents=[-1.0])]), "temperature must be"),
    (request(inputs=[tensor("text_input", "BYTES", [1], bytes_contents=[b""])]), "prompt is empty"),
    (request("minilm", inputs=[tensor("text_input", "BYTES", [2, 2])], raw_input_contents=[raw_bytes(*[b"a"] * 4)]),
     "'text_input' has shape [2, 2]"),
    (request("minilm", inputs=[tensor("text_input", "BYTES", [1], bytes_contents=[b"a"]),
                               tensor("pooling", "BYTES", [1], bytes_contents=[b"max"])]), "'pooling' is 'max'"),
    (request("minilm", inputs=[tensor("max_tokens", "INT32", [1], int_contents=[3])]), "unexpected input 'max_tokens'"),
    (request("tok@1", model_version="1", inputs=[TEXT], raw_input_contents=[PROMPT_RAW]), "give the version one way"),
]


def test_every_bad_input_is_invalid_argument_naming_it_and_the_server_serves_on(cluster, client):
    coordinator, sdk = cluster
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(coordinator.address))
    for bad, words in BAD:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (words, err.value.details())
        assert words in err.value.details(), (words, err.value.details())
    # bytes that are no ModelInferRequest
    garbage = grpc.insecure_channel(coordinator.address).unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as err:
        garbage(b"\xff\xff\xff", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ModelInferRequest" in err.value.details()
    # typed contents (no raw) work too
    typed = request(inputs=[tensor("text_input", "BYTES", [1], bytes_contents=[PROMPT.encode()]),
                            tensor("max_tokens", "INT32", [1], int_contents=[12]),
                            tensor("temperature", "FP32", [1], fp32_contents=[0.0]),
                            tensor("ignore_eos", "BOOL", [1], bool_contents=[True])])
    response = stub.ModelInfer(typed, timeout=60)
    assert response.raw_output_contents[0][4:].decode() == sdk.generate(PROMPT, model="tok", **GREEDY).text
    # an unknown model, and an unknown version, are NOT_FOUND as Triton says it
    for model, version in (("nope", ""), ("tok", "9")):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(model, model_version=version, inputs=[TEXT], raw_input_contents=[PROMPT_RAW]),
                            timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details().startswith("Request for unknown model: ")
    # in a stream, each bad request is an error response and the stream goes on
    stream = Stream(client)
    try:
        for bad, words in BAD[:6]:
            stream.client._stream._enqueue_request(bad)  # tritonclient would refuse to build some of these
            result, error = stream.next()
            assert result is None and words in error.message(), (words, error)
        stream.client.async_stream_infer("tok", greedy_inputs(), parameters={"stream": True})
        assert "".join(text_of(r) for r in stream.until_final()) == sdk.generate(PROMPT, model="tok", **GREEDY).text
    finally:
        stream.close()
    assert client.is_server_ready()
    assert sdk.generate(PROMPT, model="tok", max_tokens=2).completion_tokens == 2


def test_api_keys(loop, store, tmp_path):
    key = new_api_key()
    keys = tmp_path / "api-keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "app", "role": "client", "sha256": hash_key(key)}]}))
    config = CoordinatorConfig(store=store.root, model="tiny-llama", port=0, api_keys=keys)
    coordinator = loop.run(start_coordinator(config))
    try:
        with triton.InferenceServerClient(coordinator.address) as c:
            with pytest.raises(InferenceServerException) as err:
                c.is_server_live()
            assert err.value.status() == "StatusCode.UNAUTHENTICATED" and "Bearer" in err.value.message()
            headers = {"authorization": f"Bearer {key}"}
            assert c.is_server_live(headers=headers)
            assert not c.is_server_ready(headers=headers)  # no workers: not ready, and says so
    finally:
        loop.run(coordinator.stop())
