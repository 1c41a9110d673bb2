"""Accuracy of compressed activations and weights against the uncompressed run, measured on real stages:
greedy tokens on a fixed prompt set (how many agree, and each one's first differing position) and perplexity
on a short text shipped with shardline (shard_worker/data/accuracy_text.txt).

It starts two chains of in-process workers, loads the model into both from a parameter service (the
baseline in `--dtype` with uncompressed links, the candidate with `--wire-dtype` on every link and/or
`--quantize int8`), and drives them with the worker protocol, as the coordinator does:

    coordinator parameters --port 50052 &
    python -m shard_worker.accuracy --parameters 127.0.0.1:50052 --model smollm2 \\
        --tokenizer ~/.local/share/shardline/models/smollm2 --wire-dtype bfloat16 --quantize int8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from shardline.codec import decode_tensor, dtype_to_enum, to_numpy
from shardline.errors import ShardlineError, code_from_number, error_for_code
from shardline.server import CHANNEL_OPTIONS
from shardline.v1 import worker_pb2, worker_pb2_grpc
from shardline.wire_dtype import quantization_enum, wire_dtype_to_enum

DATA = Path(__file__).resolve().parent / "data"
PROMPTS = DATA / "accuracy_prompts.txt"
TEXT = DATA / "accuracy_text.txt"
LOGIT_CHUNK = 64  # tokens per logits step: [64, vocab] float32 is 12.5 MB for a 49k vocabulary
_ids = itertools.count(1)


def shipped_prompts() -> list[str]:
    return [line for line in PROMPTS.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Agreement:
    prompt: int
    tokens: int
    first_difference: int | None  # index of the first generated token that differs; None: all equal


@dataclass(frozen=True)
class Report:
    agreements: list[Agreement]
    perplexity_baseline: float
    perplexity_candidate: float
    weight_bytes_baseline: int
    weight_bytes_candidate: int

    @property
    def agreeing(self) -> int:
        return sum(a.first_difference is None for a in self.agreements)

    @property
    def perplexity_change(self) -> float:
        return self.perplexity_candidate / self.perplexity_baseline - 1

    def lines(self) -> list[str]:
        out = [f"greedy: {self.agreeing}/{len(self.agreements)} prompts give identical tokens"]
        out += [f"  prompt {a.prompt}: first differing token at position {a.first_difference} of {a.tokens}"
                for a in self.agreements if a.first_difference is not None]
        out.append(f"perplexity: {self.perplexity_candidate:.4f} against {self.perplexity_baseline:.4f} "
                   f"({self.perplexity_change:+.2%})")
        out.append(f"weight bytes: {self.weight_bytes_candidate} against {self.weight_bytes_baseline} "
                   f"({self.weight_bytes_candidate / max(1, self.weight_bytes_baseline):.3f}x)")
        return out


def even_split(num_layers: int, stages: int) -> list[tuple[int, int]]:
    cuts = [round(i * num_layers / stages) for i in range(stages + 1)]
    return list(itertools.pairwise(cuts))


class ChainDriver:
    """Steps through a loaded chain over one Forward stream (token ids in, tokens or logits out)."""

    def __init__(self, addresses: list[str], layers: list[tuple[int, int]]) -> None:
        self.addresses, self.layers = addresses, layers
        self._channel = grpc.aio.insecure_channel(addresses[0], options=CHANNEL_OPTIONS)
        self._call: Any = None

    async def step(self, sequences: list[worker_pb2.SequenceSlice], token_ids: list[int],
                   output: worker_pb2.OutputKind) -> worker_pb2.ForwardResponse:
        if self._call is None:
            self._call = worker_pb2_grpc.ShardWorkerStub(self._channel).Forward()
        step_id = next(_ids)
        await self._call.write(worker_pb2.ForwardRequest(step_id=step_id, sequences=sequences, token_ids=token_ids,
                                                         start_layer=0, route=self.addresses[1:], output=output))
        response: worker_pb2.ForwardResponse = await self._call.read()
        error = response.error if response.HasField("error") else (
            response.sequence_errors[0].error if response.sequence_errors else None)
        if error is not None:
            raise error_for_code(code_from_number(error.code), error.message)
        return response

    async def greedy(self, prompts: list[list[int]], steps: int, session: str) -> list[list[int]]:
        """`steps` greedy tokens after each prompt, the prompts batched in one step and decoded together."""
        seqs = [worker_pb2.SequenceSlice(session_id=f"{session}-{i}", start_position=0, num_tokens=len(p))
                for i, p in enumerate(prompts)]
        response = await self.step(seqs, [t for p in prompts for t in p], worker_pb2.OUTPUT_KIND_TOKENS)
        out = [[t] for t in response.token_ids]
        for n in range(1, steps):
            seqs = [worker_pb2.SequenceSlice(session_id=f"{session}-{i}", start_position=len(p) + n - 1,
                                             num_tokens=1) for i, p in enumerate(prompts)]
            response = await self.step(seqs, [o[-1] for o in out], worker_pb2.OUTPUT_KIND_TOKENS)
            for o, t in zip(out, response.token_ids, strict=True):
                o.append(t)
        return out

    async def perplexity(self, ids: list[int], session: str) -> float:
        """exp(mean negative log-likelihood) of ids[1:], each token predicted from all before it."""
        nll = 0.0
        for start in range(0, len(ids) - 1, LOGIT_CHUNK):
            chunk = ids[start: start + LOGIT_CHUNK]
            seq = worker_pb2.SequenceSlice(session_id=session, start_position=start, num_tokens=len(chunk))
            response = await self.step([seq], chunk, worker_pb2.OUTPUT_KIND_LOGITS)
            logits = to_numpy(decode_tensor(response.tensor)).astype(np.float64)
            targets = ids[start + 1: start + 1 + len(chunk)]
            logits = logits[: len(targets)]
            top = logits.max(axis=1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
        return math.exp(nll / (len(ids) - 1))

    async def weight_bytes(self) -> int:
        total = 0
        for address in self.addresses:
            async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
                status = await worker_pb2_grpc.ShardWorkerStub(ch).GetStatus(worker_pb2.GetStatusRequest(), timeout=30)
                total += status.weight_bytes
        return total

    async def close(self) -> None:
        if self._call is not None:
            await self._call.done_writing()
        await self._channel.close(None)


async def load_chain(addresses: list[str], model: str, parameters: str, layers: list[tuple[int, int]],
                     dtype: str = "float32", wire_dtype: str = "", quantize: str = "") -> ChainDriver:
    """LoadShard every worker of the chain (in parallel); the errors are the worker's, from the error table."""
    async def one(address: str, start: int, end: int) -> None:
        request = worker_pb2.LoadShardRequest(model=model, start_layer=start, end_layer=end,
                                              parameters_address=parameters, dtype=dtype_to_enum(dtype),
                                              wire_dtype=wire_dtype_to_enum(wire_dtype or dtype),
                                              quantize=quantization_enum(quantize))
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
            async for _ in worker_pb2_grpc.ShardWorkerStub(ch).LoadShard(request, timeout=600):
                pass

    await asyncio.gather(*(one(a, s, e) for a, (s, e) in zip(addresses, layers, strict=True)))
    return ChainDriver(addresses, layers)


async def compare(baseline: ChainDriver, candidate: ChainDriver, prompts: list[list[int]], text: list[int],
                  steps: int = 32) -> Report:
    """The candidate chain against the baseline: greedy agreement on `prompts`, perplexity on `text`."""
    want = await baseline.greedy(prompts, steps, f"accuracy-base-{next(_ids)}")
    got = await candidate.greedy(prompts, steps, f"accuracy-cand-{next(_ids)}")
    agreements = [Agreement(i, steps, next((j for j, (a, b) in enumerate(zip(w, g, strict=True)) if a != b), None))
                  for i, (w, g) in enumerate(zip(want, got, strict=True))]
    return Report(agreements, await baseline.perplexity(text, f"ppl-base-{next(_ids)}"),
                  await candidate.perplexity(text, f"ppl-cand-{next(_ids)}"),
                  await baseline.weight_bytes(), await candidate.weight_bytes())


async def _main(args: argparse.Namespace) -> Report:
    from transformers import AutoTokenizer

    from shard_worker.server import start_worker

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in shipped_prompts()]
    text = tokenizer(Path(args.text).read_text())["input_ids"]
    servers = [await start_worker() for _ in range(2 * args.stages)]
    try:
        async with grpc.aio.insecure_channel(args.parameters, options=CHANNEL_OPTIONS) as ch:
            from shardline.v1 import parameters_pb2, parameters_pb2_grpc

            manifest = await parameters_pb2_grpc.ParametersStub(ch).GetManifest(
                parameters_pb2.GetManifestRequest(model=args.model), timeout=30)
        layers = even_split(manifest.num_layers, args.stages)
        addresses = [s.address for s in servers]
        baseline = await load_chain(addresses[: args.stages], args.model, args.parameters, layers, args.dtype)
        candidate = await load_chain(addresses[args.stages:], args.model, args.parameters, layers, args.dtype,
                                     args.wire_dtype, args.quantize)
        try:
            return await compare(baseline, candidate, prompts, text, args.tokens)
        finally:
            await baseline.close()
            await candidate.close()
    finally:
        for server in servers:
            await server.stop(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard_worker.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parameters", required=True, help="host:port of a parameter service (coordinator "
                        "parameters) serving the model")
    parser.add_argument("--model", default="smollm2", help="the model's name in the store")
    parser.add_argument("--tokenizer", required=True, help="a directory with the model's tokenizer (its "
                        "directory in the store)")
    parser.add_argument("--stages", type=int, default=3, help="stages of each chain")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="compute dtype of both chains")
    parser.add_argument("--wire-dtype", default="", choices=["", "float32", "float16", "bfloat16", "int8"],
                        help="the candidate's dtype on every link (default: --dtype)")
    parser.add_argument("--quantize", default="", choices=["", "int8"], help="the candidate's weight quantization")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--text", default=str(TEXT), help="the text perplexity is measured on")
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(_main(args))
    except grpc.RpcError as err:
        sys.stderr.write(f"error: {err.code().name}: {err.details()}\n")
        return 1
    except ShardlineError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write("\n".join(report.lines()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
