"""OpenAI request bodies read into SDK calls.

What is checked here is only what JSON itself leaves open: each field's type (a 400 naming the field), the
shapes OpenAI allows (a prompt as text or token ids, a stop as one string or several), and the fields this
server cannot honour (n > 1, tools: refused by name rather than silently ignored, since
they change the output). The values themselves (ranges, limits, the model) are the coordinator's to check,
on the same path as a gRPC request, so the two APIs cannot disagree. Fields that change nothing a caller
gets back (`user`, `metadata`, ...) are accepted and ignored; a field this server does not know is refused,
as OpenAI refuses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.api.openai_errors import invalid

INT32 = 2**31
UINT64 = 2**64
# accepted and ignored: they change nothing in the answer
HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction",
                      "safety_identifier", "prompt_cache_key"})
JSON_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
              dict: "an object", type(None): "null"}
ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (NaN and Infinity are not JSON: refused, as any other malformed body)."""
    def not_json(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        data = json.loads(body, parse_constant=not_json)
    except UnicodeDecodeError:
        raise invalid("the request body is not UTF-8 JSON") from None
    except (ValueError, RecursionError) as exc:
        raise invalid(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type_name(data)}")
    return data


def type_name(value: Any) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Body:
    """A request's JSON object, read field by field: each read checks the field's JSON type and names the
    field when it is wrong; `finish` refuses the fields no read asked for."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.seen: set[str] = set(HARMLESS)

    def raw(self, name: str) -> Any:
        """The field's value, None when absent or null."""
        self.seen.add(name)
        return self.data.get(name)

    def _typed(self, name: str, ok: Callable[[Any], bool], expected: str) -> Any:
        value = self.raw(name)
        if value is not None and not ok(value):
            raise invalid(f"{name} must be {expected}, got {type_name(value)}", name)
        return value

    def string(self, name: str) -> str | None:
        return self._typed(name, lambda v: isinstance(v, str), "a string")  # type: ignore[no-any-return]

    def boolean(self, name: str) -> bool | None:
        return self._typed(name, lambda v: isinstance(v, bool), "a boolean")  # type: ignore[no-any-return]

    def number(self, name: str) -> float | None:
        value = self._typed(name, lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number")
        try:
            return None if value is None else float(value)
        except OverflowError:  # an integer past any float: no field takes it
            raise invalid(f"{name} is out of range", name) from None

    def integer(self, name: str, low: int = -INT32, high: int = INT32 - 1) -> int | None:
        """An integer field; `low`..`high` is what the gRPC field can carry (the coordinator checks the
        range that makes sense)."""
        value = self._typed(name, _is_int, "an integer")
        if value is not None and not low <= value <= high:
            raise invalid(f"{name} must be an integer between {low} and {high}, got {value}", name)
        return value  # type: ignore[no-any-return]

    def unsupported(self, name: str, neutral: Callable[[Any], bool], what: str) -> None:
        """A field this server cannot honour: accepted only with its neutral value (which changes nothing)."""
        value = self.raw(name)
        if value is not None and not neutral(value):
            raise invalid(f"{name} is not supported by this server ({what})", name)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise invalid(f"Unrecognized request argument supplied: {unknown[0]} (this server takes OpenAI's "
                          "fields, and top_k, min_tokens, ignore_eos, stop_token_ids and vLLM's neutral "
                          "extensions)", unknown[0])


@dataclass(frozen=True)
class GenerationCall:
    """A completion or chat completion as the SDK's generate/chat call, and how to answer it."""

    model: str
    params: dict[str, Any]                       # the SDK's generate_request keywords
    prompt: str | list[int] = ""                 # /v1/completions
    messages: list[dict[str, Any]] = field(default_factory=list)  # /v1/chat/completions (the SDK's shape)
    stream: bool = False
    include_usage: bool = False                  # stream_options.include_usage
    continuous_usage: bool = False               # stream_options.continuous_usage_stats: usage on every chunk
    logprobs: bool = False                       # the answer carries log probabilities (params["logprobs"])
    echo: bool = False                           # /v1/completions: the prompt comes back before the completion
    n: int = 1                                   # choices answered
    best_of: int = 0                             # /v1/completions: choices made, of which the n best are answered
    names: Mapping[str, str] = field(default_factory=dict)  # gRPC field -> the caller's, for errors' `param`


@dataclass(frozen=True)
class EmbeddingCall:
    model: str
    texts: list[str]
    base64: bool = False                         # encoding_format "base64": little-endian float32 bytes
    dimensions: int | None = None


def _common(body: Body, max_tokens_field: str) -> tuple[dict[str, Any], bool, bool, bool]:
    """The sampling and length fields both endpoints share, as SDK keywords; and stream, include_usage and
    continuous_usage_stats. The extensions vLLM-style servers take (ignore_eos, min_tokens, stop_token_ids,
    skip_special_tokens, ...) are honoured, or refused by name where their value would change the answer."""
    seed = body.integer("seed", -(2**63), UINT64 - 1)
    params: dict[str, Any] = {
        "model": body.string("model") or "",
        "max_tokens": body.integer(max_tokens_field),
        "temperature": body.number("temperature"),
        "top_p": body.number("top_p"),
        "seed": None if seed is None else seed % UINT64,  # a negative int64 seed: the same 64 bits, unsigned
        "stop": _stop(body.raw("stop")),
        "top_k": body.integer("top_k") or 0,
        "min_tokens": body.integer("min_tokens"),
        "ignore_eos": bool(body.boolean("ignore_eos")),
        "stop_token_ids": _stop_token_ids(body.raw("stop_token_ids")),
        "repetition_penalty": body.number("repetition_penalty"),
        "frequency_penalty": body.number("frequency_penalty") or 0.0,
        "presence_penalty": body.number("presence_penalty") or 0.0,
        "min_p": body.number("min_p") or 0.0,
        "logit_bias": _logit_bias(body.raw("logit_bias")),
        **_structure(body.raw("response_format"), body.raw("structured_outputs")),
    }
    body.unsupported("skip_special_tokens", lambda v: v is True, "special tokens are always left out of the text")
    body.unsupported("spaces_between_special_tokens", lambda v: v is True, "the tokenizer's own spacing is kept")
    body.unsupported("include_stop_str_in_output", lambda v: v is False, "a stop sequence is left out of the text")
    params["n"] = body.integer("n", 1) or 1
    stream = bool(body.boolean("stream"))
    options = body.raw("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict):
            raise invalid(f"stream_options must be an object, got {type_name(options)}", "stream_options")
        for key, value in options.items():
            if key not in ("include_usage", "include_obfuscation", "continuous_usage_stats"):
                raise invalid(f"stream_options.{key} is not a known stream option", "stream_options")
            if value is not None and not isinstance(value, bool):
                raise invalid(f"stream_options.{key} must be a boolean, got {type_name(value)}", "stream_options")
        include_usage = bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))  # as vLLM: with include_usage
    return params, stream, include_usage, continuous


def _structure(response_format: Any, structured: Any) -> dict[str, Any]:
    """Structured output as the SDK takes it, from OpenAI's response_format ({"type": "json_schema",
    "json_schema": {"schema": ...}} or {"type": "json_object"}) or vLLM's structured_outputs ({"json": ...},
    {"regex": ...}, {"grammar": ...}, {"choice": [...]}, {"json_object": true}); at most one of them."""
    out: dict[str, Any] = {}
    if response_format is not None:
        if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
            raise invalid("response_format must be an object with a type", "response_format")
        kind = response_format["type"]
        if kind == "json_object":
            out["json_object"] = True
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise invalid("response_format.json_schema must be an object whose schema is a JSON schema object",
                              "response_format")
            out["json_schema"] = json.dumps(spec.get("schema", {}))  # no schema: any JSON value
        elif kind != "text":
            raise invalid(f"response_format.type {kind[:40]!r} is not one of text, json_object, json_schema",
                          "response_format")
    if structured is not None:
        if not isinstance(structured, dict):
            raise invalid(f"structured_outputs must be an object, got {type_name(structured)}", "structured_outputs")
        given = {k: v for k, v in structured.items() if v not in (None, False)}
        unknown = sorted(set(given) - {"json", "regex", "grammar", "choice", "json_object"})
        if unknown:
            raise invalid(f"structured_outputs.{unknown[0][:40]} is not supported by this server (json, regex, "
                          "grammar, choice, json_object)", "structured_outputs")
        if len(given) > 1 or (given and out):
            raise invalid("give one structured output: one of structured_outputs' fields, or response_format",
                          "structured_outputs")
        for key, value in given.items():
            if key == "json":
                out["json_schema"] = value if isinstance(value, str) else json.dumps(value)
            elif key == "choice":
                if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                    raise invalid("structured_outputs.choice must be an array of non-empty strings",
                                  "structured_outputs")
                out["regex"] = "|".join(re.escape(c) for c in value)
            elif key == "json_object":
                out["json_object"] = True
            elif not isinstance(value, str):
                raise invalid(f"structured_outputs.{key} must be a string", "structured_outputs")
            else:
                out[key] = value
    return out


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's {"token id": bias} (ids as strings, as JSON keys are)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"logit_bias must be an object of token id -> bias, got {type_name(value)}", "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key[:20]!r}", "logit_bias") from None
        if not -(2**63) <= token < 2**63 or isinstance(bias, bool) or not isinstance(bias, int | float) \
                or not -1e9 < bias < 1e9:
            raise invalid(f"logit_bias[{key[:20]!r}] must be a number (-100 to 100) for a token id", "logit_bias")
        out[token] = float(bias)
    return out


def _stop_token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(t) and -INT32 <= t < INT32 for t in value):
        raise invalid(f"stop_token_ids must be an array of token ids (integers of 32 bits), got {type_name(value)}",
                      "stop_token_ids")
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise invalid(f"stop must be a string or an array of strings, got {type_name(value)}", "stop")


def _names(**renamed: str) -> dict[str, str]:
    """The gRPC API's field names (which the coordinator's messages start with) -> the caller's."""
    same = ("model", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens", "max_tokens", "stop_token_ids",
            "logprobs", "logit_bias", "repetition_penalty", "frequency_penalty", "presence_penalty", "min_p", "tools",
            "tool_choice", "n")
    structure = {"json_schema": "response_format", "json_object": "response_format", "regex": "structured_outputs",
                 "grammar": "structured_outputs"}
    return {**{n: n for n in same}, **structure, **renamed}


def completion_call(data: dict[str, Any]) -> GenerationCall:
    body = Body(data)
    params, stream, include_usage, continuous = _common(body, "max_tokens")
    if "prompt" not in data:
        raise invalid("prompt is required", "prompt")
    prompt = _prompt(body.raw("prompt"))
    logprobs = body.integer("logprobs")  # the likeliest tokens at each position (0: the chosen one's alone)
    echo = bool(body.boolean("echo"))
    params["logprobs"] = logprobs
    if echo and (logprobs is not None or not isinstance(prompt, str)):  # a prompt of ids: its text from its tokens
        params["prompt_logprobs"] = logprobs or 0
    n, best_of = params["n"], body.integer("best_of", 1) or 0
    if best_of and best_of < n:
        raise invalid(f"best_of ({best_of}) must be at least n ({n})", "best_of")
    if best_of > n:
        if stream:
            raise invalid("best_of cannot be streamed (the best are known at the end): send stream false", "best_of")
        params["n"] = best_of
        if logprobs is None:
            params["logprobs"] = 0  # the ranking's, not answered
    body.unsupported("suffix", lambda v: v == "", "no insertion: suffix must be empty")
    body.finish()
    return GenerationCall(params["model"], params, prompt=prompt, stream=stream, include_usage=include_usage,
                          continuous_usage=continuous, logprobs=logprobs is not None, echo=echo, n=n,
                          best_of=best_of,
                          names=_names(prompt="prompt", prompt_token_ids="prompt", prompt_logprobs="logprobs"))


def _prompt(value: Any) -> str | list[int]:
    """A string, an array of one string, token ids, or an array of one array of token ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value) or all(isinstance(p, list) for p in value):
            if len(value) > 1:
                raise invalid(f"prompt holds {len(value)} prompts; this server takes one prompt per request",
                              "prompt")
            return _prompt(value[0]) if isinstance(value[0], str) else _token_ids(value[0])
        return _token_ids(value)
    raise invalid("prompt must be a string, an array of one string, or token ids (an array of integers)", "prompt")


def _token_ids(value: list[Any]) -> list[int]:
    for i, t in enumerate(value):
        if not _is_int(t) or not -INT32 <= t < INT32:
            raise invalid(f"prompt[{i}] must be a token id (an integer of 32 bits), got {type_name(t)}", "prompt")
    if not value:
        raise invalid("prompt is empty", "prompt")
    return value


def chat_call(data: dict[str, Any]) -> GenerationCall:
    body = Body(data)
    if body.raw("max_tokens") is not None and body.raw("max_completion_tokens") is not None:
        raise invalid("give max_completion_tokens or max_tokens, not both", "max_tokens")
    limit = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    params, stream, include_usage, continuous = _common(body, limit)
    if "messages" not in data:
        raise invalid("messages is required", "messages")
    messages = _messages(body.raw("messages"))
    logprobs, top = bool(body.boolean("logprobs")), body.integer("top_logprobs")
    if top is not None and not logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    params["logprobs"] = (top or 0) if logprobs else None
    params["tools"] = _tools(body.raw("tools"))
    params["tool_choice"] = _tool_choice(body.raw("tool_choice"))
    body.unsupported("functions", lambda v: v == [], "the deprecated functions: send tools")
    body.unsupported("function_call", lambda v: v in ("none", "auto"), "the deprecated function_call: send "
                     "tool_choice")
    body.unsupported("modalities", lambda v: v == ["text"], "text only")
    for name in ("audio", "reasoning_effort", "verbosity", "web_search_options"):
        body.unsupported(name, lambda v: False, "this server runs the model as it is")
    body.finish()
    return GenerationCall(params["model"], params, messages=messages, stream=stream, include_usage=include_usage,
                          continuous_usage=continuous, logprobs=logprobs, n=params["n"],
                          names=_names(prompt="messages", messages="messages", max_tokens=limit,
                                       logprobs="top_logprobs"))


def _tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's tools: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"tools must be an array, got {type_name(value)}", "tools")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise invalid(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        f = tool["function"]
        if not isinstance(f.get("name"), str) or not isinstance(f.get("parameters", {}), dict) \
                or not isinstance(f.get("description", ""), str | None):
            raise invalid(f"tools[{i}].function needs a name (a string); parameters must be a JSON schema object",
                          "tools")
    return value


def _tool_choice(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value  # auto, none, required (the coordinator names what else is wrong)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict) \
            and isinstance(value["function"].get("name"), str):
        return str(value["function"]["name"])
    raise invalid("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                  "{\"name\": ...}}", "tool_choice")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with role and content, got {type_name(message)}", "messages")
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid(f"{where}.role must be a string, got {type_name(role)}", "messages")
        for key, item in message.items():
            if key not in ("role", "content", "name", "tool_calls", "tool_call_id", "refusal") and item is not None:
                raise invalid(f"{where}.{key} is not supported by this server (text chat and tool calls)",
                              "messages")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise invalid(f"{where}.name must be a string, got {type_name(message['name'])}", "messages")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list) or not all(_is_call(c) for c in calls):
            raise invalid(f"{where}.tool_calls must be an array of {{id, type, function: {{name, arguments}}}}",
                          "messages")
        if not isinstance(message.get("tool_call_id") or "", str):
            raise invalid(f"{where}.tool_call_id must be a string", "messages")
        content = message.get("content")
        out.append({"role": ROLES.get(role, role), "tool_calls": calls, "tool_call_id": message.get("tool_call_id"),
                    "content": "" if content is None and (calls or role == "tool") else
                    _content(content, f"{where}.content")})
    return out


def _is_call(c: Any) -> bool:
    """OpenAI's {id, type, function: {name, arguments (JSON text)}}."""
    f = c.get("function") if isinstance(c, dict) else None
    return isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments", ""), str)


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or text parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(f"{where} must be a string or an array of text parts, got {type_name(value)}", "messages")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type_name(part)
            raise invalid(f"{where}[{j}] has type {kind!r}; this server takes text parts only", "messages")
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}[{j}].text must be a string", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def embedding_call(data: dict[str, Any]) -> EmbeddingCall:
    body = Body(data)
    model = body.string("model") or ""
    if "input" not in data:
        raise invalid("input is required", "input")
    value = body.raw("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid("input must be a string or a non-empty array of strings (token ids are not taken here)",
                      "input")
    encoding = body.string("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid(f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    dimensions = body.integer("dimensions", 1)
    body.finish()
    return EmbeddingCall(model, texts, encoding == "base64", dimensions)


EMBEDDING_NAMES = {"model": "model", "texts": "input", "input_ids": "input"}
