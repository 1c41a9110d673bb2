"""The request log: one INFO line per Generate and per Infer, on the logger `shardline.requests`, written where
every protocol's request ends (coordinator/inference.py: native gRPC, KServe, the HTTP gateway and job items
alike), refused and cancelled requests included.

The line is key=value fields: id, kind, model (the deployment's name, or "(unknown)"), prompt_tokens,
completion_tokens, ttft_ms, duration_ms, outcome (stop | length | infer, or the gRPC status code of an error)
and, when they apply, cached, inputs, truncated, priority. No prompt text, unless the coordinator runs with
--log-prompts (`log_prompts`), which adds prompt=<JSON string>; an error's message (which may quote the
request) is logged at DEBUG only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.metrics import status_name

if TYPE_CHECKING:
    from coordinator.generation import Piece

log = logging.getLogger("shardline.requests")


@dataclass
class RequestRecord:
    """What the line of one request says, filled in as the request runs."""

    request_id: str
    kind: str                            # generate | infer
    model: str
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
        fields = [f"id={self.request_id}", f"kind={self.kind}", f"model={self.model}",
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
