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

from coordinator.api.openai_requests import GenerationCall
from shardline.client import GenerateResult, Logprob, ModelInfo, ToolCall

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

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None,
               calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
        """One choice of the non-streamed response."""
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                choice["message"]["tool_calls"] = [tool_call(c) for c in calls]
        else:
            choice["text"] = text
        return choice

    def whole(self, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The non-streamed response, with its usage."""
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str, finish_reason: str | None, first: bool, include_usage: bool,
              logprobs: dict[str, Any] | None = None, calls: Sequence[ToolCall] = (), called: int = 0,
              index: int = 0) -> dict[str, Any]:
        """One streamed piece of choice `index`; a chat's first one also says the role, and one that completes
        tool calls carries them whole (`called`: how many came before). With include_usage every chunk has
        `usage: null`, as OpenAI sends them, and `usage_chunk` ends the stream with the totals."""
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
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


@dataclass
class Choice:
    """A streamed choice's state: whether its first event went out, where its next text starts (completions'
    text_offset), the tool calls it made, whether it finished."""

    first: bool = True
    offset: int = 0
    called: int = 0
    done: bool = False


def echo_text(call: GenerationCall, prompt: Sequence[Logprob]) -> str:
    """With echo, the prompt's text: as sent, or (token ids) its tokens' texts joined."""
    if not call.echo:
        return ""
    return call.prompt if isinstance(call.prompt, str) else "".join(t.token for t in prompt)


def scored_tokens(call: GenerationCall, chat: bool, prompt: Sequence[Logprob], new: Sequence[Logprob],
                  tokens: int) -> list[Logprob] | None:
    """The tokens an answer's logprobs list (None: none asked): with echo, the prompt's first; a chat's stop at
    its tokens, a completion's keeps the token that ended it (as evaluation harnesses expect one generated
    token per call)."""
    if not call.logprobs:
        return None
    return (list(prompt) if call.echo else []) + list(new[:tokens] if chat else new)


def logprobs_object(chat: bool, scored: list[Logprob] | None, offset: int = 0) -> dict[str, Any] | None:
    if scored is None:
        return None
    return chat_logprobs(scored) if chat else completion_logprobs(scored, offset)


def best(results: Sequence[GenerateResult], n: int) -> list[GenerateResult]:
    """best_of: the n results with the highest log probability per token (OpenAI's rule), best first."""
    def per_token(r: GenerateResult) -> float:
        scores = [t.logprob for t in r.logprobs[:len(r.token_ids)] if t.logprob is not None]
        return sum(scores) / len(scores) if scores else float("-inf")

    return sorted(results, key=per_token, reverse=True)[:n]


def result_choices(answer: Answer, call: GenerationCall, r: GenerateResult) -> list[dict[str, Any]]:
    """The non-streamed answer's choices (n, or the best n of best_of)."""
    results = r.choices or [r]
    if call.best_of > call.n:
        results = best(results, call.n)
    prompt = results[0].prompt_logprobs or next((c.prompt_logprobs for c in r.choices if c.prompt_logprobs), [])
    out = []
    for index, c in enumerate(results):
        scored = scored_tokens(call, answer.chat, prompt, c.logprobs, len(c.token_ids))
        out.append(answer.choice(index, echo_text(call, prompt) + c.text, c.finish_reason,
                                 logprobs_object(answer.chat, scored), c.tool_calls))
    return out


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
