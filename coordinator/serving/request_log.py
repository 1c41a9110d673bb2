"""The request log: one INFO line per Generate and per Infer, on the logger `shardline.requests`, written where
every protocol's request ends (coordinator/fleet/requests.py: native gRPC, KServe, the HTTP gateway and job items
alike), refused and cancelled requests included.

The line is key=value fields: id, client_id (the caller's own id for the request, only when given: gRPC
metadata or the HTTP header `x-request-id`, a KServe request's `id`, a job item's `custom_id`; plain as given,
or a JSON string if it holds other characters), kind, model (the deployment's name, or "(unknown)"),
prompt_tokens, completion_tokens, ttft_ms, duration_ms, outcome (stop | length | infer, or the gRPC status code
of an error) and, when they apply, cached, inputs, truncated, priority. No prompt text, unless the coordinator
runs with --log-prompts (`log_prompts`), which adds prompt=<JSON string>; an error's message (which may quote
the request) is logged at DEBUG only.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coordinator.metrics import status_name
from shardline.errors import InvalidArgument

if TYPE_CHECKING:
    from coordinator.serving.generation import Piece

log = logging.getLogger("shardline.requests")
REQUEST_ID_KEY = "x-request-id"  # gRPC metadata and HTTP header: the caller's own id for a request
MAX_REQUEST_ID_CHARS = 128
_BARE = re.compile(r"[A-Za-z0-9._:/+=@-]+")  # written as is; anything else is written as a JSON string


def check_request_id(value: str) -> str:
    """A caller's request id as given, or InvalidArgument saying what it may be."""
    if len(value) > MAX_REQUEST_ID_CHARS or not value.isascii() or not value.isprintable():
        raise InvalidArgument(f"{REQUEST_ID_KEY} must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters "
                              f"(got {len(value)} characters)")
    return value


def request_id_of(context: Any) -> str:
    """The caller's `x-request-id` gRPC metadata ("" without one); InvalidArgument if it is malformed."""
    for key, value in (context.invocation_metadata() or ()) if context is not None else ():
        if key == REQUEST_ID_KEY:
            return check_request_id(value if isinstance(value, str) else value.decode("latin-1"))
    return ""


@dataclass
class RequestRecord:
    """What the line of one request says, filled in as the request runs."""

    request_id: str
    kind: str                            # generate | infer
    model: str
    client_id: str = ""                  # the caller's own id for the request (check_request_id)
    began: float = field(default_factory=time.perf_counter)
    first: float = 0.0                   # the first token's time (0: none yet)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = ""
    cached: bool = False
    background: bool = False
    inputs: int = 0                      # an Infer's inputs
    truncated: int = 0                   # ... of which cut to the model's positions
    prompt: str | None = None            # JSON of the prompt (or messages, or texts): only with --log-prompts

    def piece(self, piece: Piece) -> None:
        if (piece.token_ids or piece.finish_reason) and not self.first:
            self.first = time.perf_counter()
        if piece.finish_reason:
            self.outcome = piece.finish_reason
            self.cached = piece.cached
            self.prompt_tokens = piece.prompt_tokens
            self.completion_tokens = piece.completion_tokens

    def failed(self, exc: BaseException) -> None:
        if not self.outcome:
            self.outcome = status_name(exc)
            log.debug("request %s: %s", self.request_id, exc)

    def line(self) -> str:
        ttft = f"{(self.first - self.began) * 1000:.1f}" if self.first else "-"
        fields = [f"id={self.request_id}"]
        if self.client_id:
            bare = _BARE.fullmatch(self.client_id)
            fields.append(f"client_id={self.client_id if bare else json.dumps(self.client_id)}")
        fields += [f"kind={self.kind}", f"model={self.model}",
                  f"prompt_tokens={self.prompt_tokens}", f"completion_tokens={self.completion_tokens}",
                  f"ttft_ms={ttft}", f"duration_ms={(time.perf_counter() - self.began) * 1000:.1f}",
                  f"outcome={self.outcome or 'CANCELLED'}"]
        if self.cached:
            fields.append("cached=true")
        if self.background:
            fields.append("priority=background")
        if self.kind == "infer":
            fields += [f"inputs={self.inputs}", f"truncated={self.truncated}"]
        if self.prompt is not None:
            fields.append(f"prompt={self.prompt}")
        return "request " + " ".join(fields)

    def write(self) -> None:
        log.info("%s", self.line())


def prompt_json(value: object) -> str:
    """A prompt as one JSON string: newlines and quotes escaped, so the log line stays one line."""
    return json.dumps(value)
