"""What the ecosystem's protocols cost against the native gRPC API, in the same run.

The built-in SmolLM2 on 2 worker processes (`coordinator launch`'s LocalCluster, the coordinator in this
process, the HTTP gateway beside it as `launch` starts it; result cache off). One streamed generation at a time
(a single stream: the protocol's overhead, not batching), greedy, `ignore_eos`, --tokens new tokens from the
same text prompt, through:
  native   the SDK's Client.generate(stream=True) (shardline.v1.Coordinator/Generate)
  kserve   tritonclient.grpc start_stream / async_stream_infer (inference.GRPCInferenceService/ModelStreamInfer)
  openai   the openai client's completions.create(stream=True) (server-sent events from the HTTP gateway)
Time to first token = request sent to the first message that carries a token (a response / an SSE chunk);
tokens/s = tokens produced / request sent to the last message. Every side's token count is checked against
--tokens (from the final message's usage), and the three texts are compared. The sides run in a rotating order
within each of --rounds rounds; figures are medians, ratios against the native side of the same run. The
clients run in threads of this process, beside the coordinator, each with its own connection.

    python bench/protocols.py [--rounds 7] [--tokens 64] [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.generate import free_port  # noqa: E402
from coordinator.api.http_launch import start_beside  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore, default_store  # noqa: E402
from shardline.client import Client  # noqa: E402

PROMPT = "The history of the printing press begins"
MODEL = "smollm2"


def native(endpoint: str, tokens: int) -> tuple[float, float, int, str]:
    with Client(endpoint, timeout=600) as client:
        began = time.perf_counter()
        first = 0.0
        count, texts = 0, []
        for chunk in client.generate(PROMPT, stream=True, max_tokens=tokens, temperature=0, ignore_eos=True):
            if chunk.token_ids and not first:
                first = time.perf_counter() - began
            count += len(chunk.token_ids)
            texts.append(chunk.text)
        return first, time.perf_counter() - began, count, "".join(texts)


def kserve(endpoint: str, tokens: int) -> tuple[float, float, int, str]:
    import tritonclient.grpc as triton

    def tensor(name: str, value: object, datatype: str, np_type: object) -> triton.InferInput:
        x = triton.InferInput(name, [1], datatype)
        x.set_data_from_numpy(np.array([value], dtype=np_type))
        return x

    inputs = [tensor("text_input", PROMPT.encode(), "BYTES", object), tensor("max_tokens", tokens, "INT32", np.int32),
              tensor("temperature", 0.0, "FP32", np.float32), tensor("ignore_eos", True, "BOOL", bool)]
    answers: queue.Queue[tuple[float, object, object]] = queue.Queue()
    texts: list[str] = []
    with triton.InferenceServerClient(endpoint) as client:
        client.start_stream(callback=lambda result, error: answers.put((time.perf_counter(), result, error)))
        began = time.perf_counter()
        first = 0.0
        client.async_stream_infer(MODEL, inputs, parameters={"stream": True})
        while True:
            at, result, error = answers.get(timeout=600)
            if error is not None:
                raise SystemExit(f"kserve: {error}")
            out = result.as_numpy("text_output")  # type: ignore[attr-defined]
            if out is not None:
                texts.extend(x.decode() for x in out.reshape(-1))
                first = first or at - began
            parameters = result.get_response().parameters  # type: ignore[attr-defined]
            if parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    return first, at - began, int(parameters["completion_tokens"].int64_param), "".join(texts)


def openai_sse(url: str, tokens: int) -> tuple[float, float, int, str]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)
    began = time.perf_counter()
    first = 0.0
    count, texts = 0, []
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices:
            first = first or time.perf_counter() - began
            texts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    took = time.perf_counter() - began
    client.close()
    return first, took, count, "".join(texts)


async def main(args: argparse.Namespace) -> None:
    store = ModelStore(args.store)
    if not store.has(MODEL):
        import_gguf(store, builtin_gguf(), MODEL)
    port, http_port = free_port(), free_port()
    config = CoordinatorConfig(store=args.store, model=MODEL, workers=2, port=port, http_port=http_port,
                               jobs_dir=args.jobs_dir)
    cluster = LocalCluster(config)
    await cluster.start()
    gateway = await start_beside(config, port)
    assert gateway is not None
    endpoint = f"127.0.0.1:{port}"
    sides = {"native": lambda: native(endpoint, args.tokens), "kserve": lambda: kserve(endpoint, args.tokens),
             "openai": lambda: openai_sse(gateway.url, args.tokens)}
    results: dict[str, list[tuple[float, float, int, str]]] = {name: [] for name in sides}
    try:
        for run in sides.values():  # warm up each path once
            await asyncio.to_thread(run)
        names = list(sides)
        for r in range(args.rounds):
            order = names[r % 3:] + names[:r % 3]
            for name in order:
                results[name].append(await asyncio.to_thread(sides[name]))
            print("  round", r + 1, " ".join(f"{n} {results[n][-1][0] * 1000:.1f} ms / "
                                             f"{results[n][-1][2] / results[n][-1][1]:.1f} tok/s" for n in names),
                  flush=True)
    finally:
        await gateway.stop()
        await cluster.stop()
    texts = {n: {x[3] for x in v} for n, v in results.items()}
    counts = {n: {x[2] for x in v} for n, v in results.items()}
    if any(c != {args.tokens} for c in counts.values()):
        raise SystemExit(f"a side produced another number of tokens than {args.tokens}: {counts}; void")
    same = all(t == texts["native"] for t in texts.values()) and len(texts["native"]) == 1
    base_first = statistics.median(x[0] for x in results["native"])
    base_rate = statistics.median(x[2] / x[1] for x in results["native"])
    print(f"\n{args.rounds} rounds, {args.tokens} tokens each, same text on every side: {same}\n")
    print("| path | time to first token | vs native | tokens/s | vs native |\n|---|---:|---:|---:|---:|")
    for name in names:
        first = statistics.median(x[0] for x in results[name])
        rate = statistics.median(x[2] / x[1] for x in results[name])
        print(f"| {name} | {first * 1000:.1f} ms | {(first - base_first) * 1000:+.1f} ms | {rate:.1f} | "
              f"{rate / base_rate:.3f}× |")


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=default_store())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as jobs_dir:
        arguments.jobs_dir = Path(jobs_dir)
        asyncio.run(main(arguments))
