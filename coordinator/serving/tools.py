"""Tool calls in chat: the tools a request offers (rendered by the model's own chat template), the grammar
that forces a call when the request asks for one, and the parser that takes the calls out of the text.

The calls are written the way Hermes-style templates ask (Qwen 2.5, Hermes 3, SmolLM3 and others):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside such blocks is the message's content. A forced call (tool_choice "required", or a function named)
is written under structured output (coordinator/serving/constraints.py), so its arguments are JSON valid
against the tool's parameters schema; with "auto" the model decides, and a block that is not valid JSON stays
in the content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from coordinator.serving.constraints import JSON_OPTIONS, schema_error
from shardline.errors import InvalidArgument

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = "{}"  # its arguments' JSON schema, as JSON text


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


def check_tools(tools: tuple[Tool, ...], choice: str) -> None:
    """Names, schemas and the choice, before anything runs; errors name the field."""
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"tools holds {len(tools)} tools; the limit is {MAX_TOOLS}")
    names = [t.name for t in tools]
    for i, t in enumerate(tools):
        if not t.name or not all(c.isalnum() or c in "_-." for c in t.name) or len(t.name) > 64:
            raise InvalidArgument(f"tools[{i}].name must be 1 to 64 letters, digits, '_', '-' or '.'")
        if names.count(t.name) > 1:
            raise InvalidArgument(f"tools[{i}].name {t.name!r} is given twice")
        try:
            schema = json.loads(t.parameters)
        except ValueError as exc:
            raise InvalidArgument(f"tools[{i}].parameters is not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise InvalidArgument(f"tools[{i}].parameters must be a JSON schema object")
    if choice not in ("", "auto", "none", "required") and choice not in names:
        raise InvalidArgument(f"tool_choice {choice[:64]!r} is not auto, none, required or the name of one of tools")
    if choice == "required" and not tools:
        raise InvalidArgument("tool_choice is required, but tools is empty")


def check_schemas(tools: tuple[Tool, ...]) -> None:
    """Each tool's parameters compile with llguidance (compute: off the event loop, in `prepare`)."""
    for i, t in enumerate(tools):
        error = schema_error(json.loads(t.parameters))
        if error:
            raise InvalidArgument(f"tools[{i}].parameters is not a JSON schema this server can follow: {error}")


def tools_bytes(tools: tuple[Tool, ...]) -> int:
    return sum(len(t.name) + len(t.description.encode()) + len(t.parameters.encode()) for t in tools)


def template_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """The tools as chat templates take them (OpenAI's shape)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": json.loads(t.parameters)}} for t in tools]


def forced_grammar(tools: tuple[Tool, ...], choice: str) -> str | None:
    """The Lark grammar (llguidance's dialect) of one call to the chosen tool (or to any, "required"), its
    arguments valid against the tool's schema; None when the model may choose."""
    if choice in ("", "auto", "none"):
        return None
    chosen = [t for t in tools if choice == "required" or t.name == choice]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)}} for t in chosen]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": JSON_OPTIONS}  # one way to write whitespace, as for json_schema
    return f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}\n'


def new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(block: str) -> ToolCall | None:
    """One block's call ({"name": ..., "arguments": {...}}), or None when it is not one."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ToolCall(new_id(), value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


class CallStream:
    """Splits a chat's text, as it streams, into content and calls: text that may be the start of a block is
    held back until it is known."""

    def __init__(self) -> None:
        self._held = ""
        self._after_call = False  # the newlines that end a call's line are the call's, not content
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content that is final now, and the calls completed by `text`."""
        if self._after_call and not self._held:
            text = text.lstrip("\n")
            self._after_call = not text
        self._held += text
        content, calls = "", []
        while True:
            start = self._held.find(OPEN)
            if start < 0:
                keep = _partial(self._held, OPEN)  # "<tool" at the end may begin a block
                content += self._held[:len(self._held) - keep]
                self._held = self._held[len(self._held) - keep:]
                break
            end = self._held.find(CLOSE, start)
            content += self._held[:start]
            if end < 0:
                self._held = self._held[start:]
                break
            block = self._held[start + len(OPEN): end]
            call = parse_call(block.strip())
            if call is None:
                content += self._held[start: end + len(CLOSE)]  # not a call: it stays text
            else:
                calls.append(call)
            self._held = self._held[end + len(CLOSE):]
            if call is not None:
                self._held = self._held.lstrip("\n")
                self._after_call = not self._held
        self.calls += calls
        return content, calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end: what is still held is content (an unclosed block is not a call)."""
        held, self._held = self._held, ""
        return held, []


def _partial(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
