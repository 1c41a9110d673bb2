"""Jobs from the client's side: job files (JSON Lines) into JobItems, and the values the job calls return
(the calls themselves, of Client and AsyncClient alike, are in shardline.client_calls).

A job file has one request per line, as a JSON object:
- generate: the GenerateRequest's fields (`prompt`, `messages` or `prompt_token_ids`; `max_tokens`,
  `temperature`, `top_k`, `top_p`, `seed`, `stop`, `min_tokens`, `ignore_eos`, `model`);
- infer: `texts` (with `pooling`: "mean" or "cls", `normalize`, `model`);
- either with an optional `custom_id`, returned with the result.
OpenAI's batch form is read too: {"custom_id": ..., "url": "/v1/chat/completions" | "/v1/completions" |
"/v1/embeddings", "body": {...}}, taking the body's messages or prompt, max_tokens, temperature, top_p, seed,
stop and model (input for embeddings). Blank lines are skipped; errors name the line.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format

from shardline.codec import decode_tensor, to_numpy
from shardline.errors import InvalidArgument
from shardline.v1 import coordinator_pb2

FINISHED = ("completed", "cancelled", "expired")
OPENAI_BODY = ("model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop")
FINISH = {coordinator_pb2.FINISH_REASON_LENGTH: "length", coordinator_pb2.FINISH_REASON_STOP: "stop",
          coordinator_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}


def item_from_dict(obj: Any, line: int = 0) -> coordinator_pb2.JobItem:
    """One job line's object as a JobItem (ValueError naming the line when it is not a request)."""
    where = f"line {line}" if line else "item"
    if not isinstance(obj, Mapping):
        raise InvalidArgument(f"{where}: a job line is a JSON object, not {type(obj).__name__}")
    fields = dict(obj)
    custom_id = fields.pop("custom_id", "")
    if "body" in fields:  # OpenAI's batch line
        url, body = str(fields.pop("url", "")), fields.pop("body")
        fields.pop("method", None)
        if fields or not isinstance(body, Mapping):
            raise InvalidArgument(f"{where}: an OpenAI batch line has custom_id, method, url and an object body")
        if url.endswith("/embeddings"):
            inputs = body.get("input", [])
            fields = {"texts": [inputs] if isinstance(inputs, str) else inputs, "model": body.get("model", "")}
        else:
            fields = {k: v for k, v in body.items() if k in OPENAI_BODY}
            if isinstance(fields.get("stop"), str):
                fields["stop"] = [fields["stop"]]
    item = coordinator_pb2.JobItem(custom_id=str(custom_id), source_line=line)
    _check_keys(fields, coordinator_pb2.InferRequest if "texts" in fields else coordinator_pb2.GenerateRequest,
                where)
    try:
        if "texts" in fields:
            pooling = str(fields.pop("pooling", "mean")).upper()
            json_format.ParseDict({**fields, "pooling": f"POOLING_{pooling}"}, item.infer)
        else:
            json_format.ParseDict(fields, item.generate)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    return item


def _check_keys(fields: Mapping[str, Any], message: Any, where: str) -> None:
    """An unknown key names itself, the closest one a line may have, and all of them (as the file spells
    them: snake_case), before protobuf's own message (camelCase, without custom_id) could."""
    known = [f.name for f in message.DESCRIPTOR.fields if f.name not in ("source_line",)]
    taken = {*known, *(f.json_name for f in message.DESCRIPTOR.fields), "pooling"}
    for key in fields:
        if key not in taken:
            close = difflib.get_close_matches(str(key), [*known, "custom_id"], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InvalidArgument(f"{where}: unknown key {str(key)[:64]!r}{hint} (a line takes custom_id and "
                                  f"{', '.join(known)})")


def items_from_jsonl(text: str) -> list[coordinator_pb2.JobItem]:
    """A job file's items, each knowing its line."""
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {number}: not JSON ({exc.msg} at column {exc.colno})") from None
        items.append(item_from_dict(obj, number))
    if not items:
        raise InvalidArgument("the job file has no requests (one JSON object per line)")
    return items


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str         # queued, running, completed, cancelled
    label: str
    total: int
    done: int
    failed: int
    cancelled: int
    cached: int
    created: float     # seconds since the epoch
    finished_at: float  # 0 = not finished
    expires: float
    message: str
    models: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @classmethod
    def of(cls, j: coordinator_pb2.JobInfo) -> JobStatus:
        return cls(j.job_id, j.state, j.label, j.total, j.done, j.failed, j.cancelled, j.cached,
                   j.created_unix_ms / 1000, j.finished_unix_ms / 1000, j.expires_unix_ms / 1000, j.message,
                   tuple(j.models))


@dataclass(frozen=True)
class JobItemResult:
    index: int
    custom_id: str
    state: str                      # pending, done, failed, cancelled
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embeddings: np.ndarray | None = None  # infer items: [inputs, hidden]
    error: str = ""
    cached: bool = False

    @classmethod
    def of(cls, r: coordinator_pb2.JobItemResult) -> JobItemResult:
        vectors = to_numpy(decode_tensor(r.embeddings, "embeddings")).copy() if r.HasField("embeddings") else None
        error = f"{r.error_code}: {r.error}" if r.error else ""
        return cls(r.index, r.custom_id, r.state, r.text, tuple(r.token_ids), FINISH.get(r.finish_reason),
                   r.usage.prompt_tokens, r.usage.completion_tokens, vectors, error, r.cached)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready object (one line of `coordinator jobs results`)."""
        out: dict[str, Any] = {"index": self.index, "custom_id": self.custom_id, "state": self.state}
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings.tolist()
        elif self.state == "done":
            out.update(text=self.text, token_ids=list(self.token_ids), finish_reason=self.finish_reason,
                       usage={"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
                       cached=self.cached)
        if self.error:
            out["error"] = self.error
        return out


def as_item(item: Any) -> coordinator_pb2.JobItem:
    if isinstance(item, coordinator_pb2.JobItem):
        return item
    if isinstance(item, coordinator_pb2.GenerateRequest):
        return coordinator_pb2.JobItem(generate=item)
    if isinstance(item, coordinator_pb2.InferRequest):
        return coordinator_pb2.JobItem(infer=item)
    return item_from_dict(item)
