"""Infer: one forward pass over a batch of inputs through an encoder's stages, pooled into one vector each.

Inputs are sorted by length (less padding) and cut into micro-batches that all enter the pipeline at once,
so they flow through the stages back to back; the hidden states that come back are mean-pooled (or the
first token taken) and normalized as sentence-transformers does.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from coordinator.serving.pipeline import Pipeline
from coordinator.serving.streams import TOKEN_WAIT_S
from shardline.codec import RawTensor, decode_tensor, to_numpy
from shardline.errors import InvalidArgument
from shardline.limits import MAX_RESPONSE_BYTES
from shardline.v1 import worker_pb2


class Pooling(StrEnum):
    MEAN = "mean"  # over each input's tokens (sentence-transformers' default)
    CLS = "cls"    # the first token's hidden state


@dataclass(frozen=True)
class EmbedRequest:
    """An Infer as the core takes it: texts to tokenize, or token ids (with an optional mask), never both."""

    model: str = ""
    texts: tuple[str, ...] = ()
    input_ids: RawTensor | None = None
    attention_mask: RawTensor | None = None
    pooling: Pooling = Pooling.MEAN
    normalize: bool = True
    truncate: bool = False  # a text over the model's positions is cut to them instead of refused

    @property
    def batch(self) -> int:
        if self.texts:
            return len(self.texts)
        return self.input_ids.shape[0] if self.input_ids is not None and self.input_ids.shape else 0


def check_batch(size: int, limit: int) -> None:
    if size == 0:
        raise InvalidArgument("texts is empty (send texts or input_ids)")
    if size > limit:
        raise InvalidArgument(f"a batch of {size} inputs is above the limit of {limit} (max_infer_batch)")


def check_response_size(size: int, hidden: int) -> None:
    """The embeddings must fit in one response (the SDK's channels accept MAX_RESPONSE_BYTES)."""
    if hidden and size * hidden * 4 > MAX_RESPONSE_BYTES:
        raise InvalidArgument(f"a batch of {size} inputs makes {size * hidden * 4} bytes of embeddings ({hidden} "
                              f"floats each); a response holds at most {MAX_RESPONSE_BYTES} bytes: send fewer")


def check_tokens(inputs: list[list[int]], limit: int) -> None:
    total = sum(len(i) for i in inputs)
    if total > limit:
        raise InvalidArgument(f"the inputs are {total} tokens together; the limit is {limit} (max_infer_tokens)")


def inputs_from_tensors(input_ids: RawTensor, mask: RawTensor | None, vocab: int, positions: int) -> list[list[int]]:
    """Each row's token ids where the mask is 1; errors name the field."""
    if input_ids.dtype not in ("int64", "int32"):
        raise InvalidArgument(f"input_ids.dtype is {input_ids.dtype}; expected int64 or int32")
    if len(input_ids.shape) != 2:
        raise InvalidArgument(f"input_ids.shape {list(input_ids.shape)} must be [batch, length]")
    ids = to_numpy(input_ids).astype(np.int64)
    keep = np.ones(ids.shape, dtype=bool)
    if mask is not None:
        if mask.dtype not in ("int64", "int32", "uint8"):
            raise InvalidArgument(f"attention_mask.dtype is {mask.dtype}; expected an integer type")
        if mask.shape != input_ids.shape:
            raise InvalidArgument(f"attention_mask.shape {list(mask.shape)} must equal input_ids.shape "
                                  f"{list(input_ids.shape)}")
        values = to_numpy(mask)
        if not np.isin(values, (0, 1)).all():
            raise InvalidArgument("attention_mask holds values other than 0 and 1")
        keep = values == 1
    if ids.shape[1] > positions:
        raise InvalidArgument(f"input_ids length {ids.shape[1]} exceeds the model's {positions} positions")
    outside = ids[keep & ((ids < 0) | (ids >= vocab))]
    if outside.size:
        raise InvalidArgument(f"input_ids holds {int(outside[0])}, outside the vocabulary [0, {vocab})")
    rows = [row[k].tolist() for row, k in zip(ids, keep, strict=True)]
    empty = next((i for i, r in enumerate(rows) if not r), None)
    if empty is not None:
        raise InvalidArgument(f"input_ids row {empty} has no tokens (its attention_mask is all 0)")
    return rows


async def embed(pipeline: Pipeline, inputs: list[list[int]], micro_batch: int, pooling: str,
                normalize: bool, wait_s: float = TOKEN_WAIT_S) -> np.ndarray:
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    prefix = uuid.uuid4().hex[:12]
    batches = [order[i: i + micro_batch] for i in range(0, len(order), micro_batch)]

    async def run(batch: list[int]) -> list[np.ndarray]:
        sequences = [worker_pb2.SequenceSlice(session_id=f"{prefix}-{i}", start_position=0,
                                              num_tokens=len(inputs[i])) for i in batch]
        ids = [t for i in batch for t in inputs[i]]
        response = await pipeline.stateless_step(sequences, ids, worker_pb2.OUTPUT_KIND_HIDDEN, wait_s)
        hidden = to_numpy(decode_tensor(response.tensor)).astype(np.float32)
        bounds = np.cumsum([0] + [len(inputs[i]) for i in batch])
        rows = [hidden[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [r.mean(axis=0) if pooling == "mean" else r[0] for r in rows]

    pooled = await asyncio.gather(*(run(b) for b in batches))  # all in flight: the stages work back to back
    out = np.empty((len(inputs), pooled[0][0].shape[0]), dtype=np.float32)
    for batch, vectors in zip(batches, pooled, strict=True):
        for i, vector in zip(batch, vectors, strict=True):
            out[i] = vector
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
