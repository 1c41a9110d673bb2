"""Structured output: a request's JSON schema, JSON object, regular expression or grammar, turned into the
tokens allowed at each step, with llguidance (a maintained Rust engine, one of vLLM's and SGLang's backends,
with no dependencies of its own).

The matcher lives with the coordinator's stream, not on a worker: the coordinator computes each step's mask
(one bit per token) and sends it with the slice, and the last stage only masks its logits before sampling
(shard_worker/scoring.py). So a worker's failover, a replay or a batch never touches the grammar's state, and a
resumed stream rebuilds it by feeding the matcher the tokens it already has.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shardline.errors import Internal, InvalidArgument

# a grammar's size and the work of one mask are bounded: a request cannot make a step slow for its batch
JSON_OPTIONS: Any = {"whitespace_flexible": False}
MAX_GRAMMAR_SIZE, MAX_LEXER_STATES, STEP_FUEL, STEP_ITEMS = 50_000, 50_000, 200_000, 50_000


class GrammarKind(StrEnum):
    JSON_SCHEMA = "json_schema"  # the output is JSON valid against the schema
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"              # the whole output matches the regular expression
    GRAMMAR = "grammar"          # a Lark grammar, in llguidance's dialect


@dataclass(frozen=True)
class Structure:
    """What a request asks its output to follow; `spec` is the schema (JSON text), the regex or the grammar."""

    kind: GrammarKind
    spec: str = ""

    @property
    def field(self) -> str:
        return self.kind.value


def _limits() -> Any:
    import llguidance

    return llguidance.LLParserLimits(max_grammar_size=MAX_GRAMMAR_SIZE, max_lexer_states=MAX_LEXER_STATES,
                                     step_lexer_fuel=STEP_FUEL, step_max_items=STEP_ITEMS, verbose_errors=False)


def compile_grammar(structure: Structure, tokenizer: Any) -> str:
    """The llguidance grammar of `structure`, checked against the model's tokenizer (an `LLTokenizer`):
    INVALID_ARGUMENT naming the field when it cannot compile, is too large, or matches nothing."""
    import llguidance

    name = structure.field
    if structure.kind in (GrammarKind.JSON_SCHEMA, GrammarKind.JSON_OBJECT):
        try:
            schema = json.loads(structure.spec) if structure.kind is GrammarKind.JSON_SCHEMA else {"type": "object"}
        except ValueError as exc:
            raise InvalidArgument(f"{name} is not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise InvalidArgument(f"{name} must be a JSON schema (an object), got {type(schema).__name__}")
        try:
            # one way to write whitespace (", " and ": "), not any: a model cannot spend its tokens on blanks
            # (a schema's own "x-guidance" options may say otherwise)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidArgument(f"{name} cannot be compiled: {exc}") from None
    elif structure.kind is GrammarKind.REGEX:
        try:
            re.compile(structure.spec)  # the common syntax errors, said the way Python users know them
        except re.error as exc:
            raise InvalidArgument(f"regex is not a regular expression: {exc}") from None
        grammar = llguidance.LLMatcher.grammar_from_regex(structure.spec)
    else:
        grammar = llguidance.LLMatcher.grammar_from_lark(structure.spec)
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=_limits())
    if error:
        raise InvalidArgument(f"{name} cannot be compiled: {' '.join(error.split())[:300]}")
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_limits())
    if matcher.is_error():
        raise InvalidArgument(f"{name} cannot be compiled: {' '.join(matcher.get_error().split())[:300]}")
    if not any(matcher.compute_bitmask()):
        raise InvalidArgument(f"{name} matches no text this model's tokens can write")
    return grammar


def schema_error(schema: dict[str, Any]) -> str:
    """Why llguidance cannot follow a JSON schema ("" when it can), without a tokenizer."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        return str(exc)[:300]
    return " ".join(llguidance.LLMatcher.validate_grammar(grammar, limits=_limits()).split())[:300]


class Constraint:
    """One stream's matcher: the tokens it allows next (a bitmask, one bit per token id, in 32-bit
    little-endian words), and the tokens the stream produced fed to it."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_limits())
        self._mask: bytes | None = None

    def mask(self) -> bytes:
        if self._mask is None:
            self._mask = self._matcher.compute_bitmask()
            if self._matcher.is_error():
                raise Internal(f"the output's grammar failed: {self._matcher.get_error()[:300]}")
        return self._mask

    def copy(self) -> Constraint:
        """Another stream's matcher in this one's state (another choice of the same request)."""
        twin = Constraint.__new__(Constraint)
        twin._matcher, twin._mask = self._matcher.deep_copy(), self._mask
        return twin

    def consume(self, token: int) -> bool:
        """Feed a produced token; False when the grammar does not allow it (it cannot go on)."""
        self._mask = None
        return bool(self._matcher.consume_token(token))

    @property
    def finished(self) -> bool:
        """Nothing can follow but the end of the sequence: the output is complete."""
        return bool(self._matcher.is_stopped())
