"""OpenAI's response shapes, built from what the SDK returns: completions and chat completions (whole, or as
stream chunks), embeddings, the model list. Plain dicts, serialized by the gateway."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardline.client import Logprob, ModelInfo, ToolCall

OWNER = "shardline"


@dataclass(frozen=True)
class Answer:
    """What every response of one request shares: its id, creation time and model, and its endpoint."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}")

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int,
              logprobs: dict[str, Any] | None = None, calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
        """The non-streamed response, with its usage."""
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                choice["message"]["tool_calls"] = [tool_call(c) for c in calls]
            head = self._head("chat.completion")
        else:
            choice["text"] = text
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str, finish_reason: str | None, first: bool, include_usage: bool,
              logprobs: dict[str, Any] | None = None, calls: Sequence[ToolCall] = (), called: int = 0
              ) -> dict[str, Any]:
        """One streamed piece; a chat's first one also says the role, and one that completes tool calls carries
        them whole (`called`: how many came before). With include_usage every chunk has `usage: null`, as OpenAI
        sends them, and `usage_chunk` ends the stream with the totals."""
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
            if calls:
                choice["delta"]["tool_calls"] = [{"index": called + i, **tool_call(c)} for i, c in enumerate(calls)]
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice["text"] = text
            out = {**self._head("text_completion"), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def tool_call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def completion_logprobs(entries: Sequence[Logprob], offset: int = 0) -> dict[str, Any]:
    """/v1/completions' logprobs: parallel lists of the tokens, their log probabilities (null for a prompt's
    first token), the likeliest at each position ({token: log probability}) and where each token starts in
    the text (from `offset`)."""
    offsets = []
    for t in entries:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in entries], "token_logprobs": [t.logprob for t in entries],
            "top_logprobs": [None if t.logprob is None else {text: lp for _, text, lp in t.top} for t in entries],
            "text_offset": offsets}


def chat_logprobs(entries: Sequence[Logprob]) -> dict[str, Any]:
    """/v1/chat/completions' logprobs: each token with its UTF-8 bytes and its likeliest alternatives."""
    def one(token: str, lp: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    return {"content": [{**one(t.token, t.logprob), "top_logprobs": [one(text, lp) for _, text, lp in t.top]}
                        for t in entries], "refusal": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def embeddings(model: str, vectors: np.ndarray, tokens: int, as_base64: bool) -> dict[str, Any]:
    """One entry per input; base64 is the vector's little-endian float32 bytes (what OpenAI's SDK asks for by
    default, and decodes)."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(row.tobytes()).decode("ascii") if as_base64 else row.tolist()}
            for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def model_id(m: ModelInfo) -> str:
    """What a request names to reach this deployment: the name for its default version, else name@version."""
    return m.name if m.is_default else f"{m.name}@{m.version}"


def model_entry(m: ModelInfo) -> dict[str, Any]:
    return {"id": model_id(m), "object": "model", "created": 0, "owned_by": OWNER, "root": m.name,
            "version": m.version, "task": m.task, "ready": m.ready, "state": m.state,
            "max_model_len": m.context_tokens or None}


def models(found: Sequence[ModelInfo]) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(m) for m in found]}
