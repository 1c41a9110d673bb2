"""The model's text side on the coordinator: tokenizer, chat template, context length, stop tokens, and
incremental detokenization with stop sequences."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jinja2

from coordinator.serving.stops import StopMatcher
from shardline.errors import FailedPrecondition, InvalidArgument

MAX_PENDING_TOKENS = 4


class TokenModel:
    """A model's token side, from its config alone: context, vocabulary, end-of-sequence ids. A model
    without a tokenizer in the store is served through it: prompts as token ids, token ids back, no text."""

    tokenizer: Any = None

    def __init__(self, path: Path, name: str = "") -> None:
        self.name = name or path.name
        config = json.loads((path / "config.json").read_text())
        self.context_tokens = int(config.get("max_position_embeddings") or config.get("n_positions") or 0)
        self.vocab_size = int(config.get("vocab_size") or 0)
        self.hidden_size = int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0)
        eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.stop_ids = frozenset(int(i) for i in eos_ids if i is not None)

    def _no_text(self) -> FailedPrecondition:
        return FailedPrecondition(f"model {self.name!r} has no tokenizer in the store: send prompt_token_ids, or "
                                  "import it with a tokenizer (`coordinator import --random ... --tokenizer "
                                  "smollm2`)")

    def encode(self, prompt: str) -> list[int]:
        raise self._no_text()

    def encode_chat(self, messages: list[Any], tools: list[dict[str, Any]] | None = None) -> list[int]:
        raise self._no_text()

    def encode_batch(self, texts: list[str], max_tokens: int, truncate: bool = False) -> tuple[list[list[int]], int]:
        raise self._no_text()

    def decode(self, ids: list[int]) -> str:
        return ""

    def token_text(self, token_id: int) -> str:
        """One token's text alone (log probabilities name their tokens with it)."""
        return ""

    def guidance(self) -> Any:
        """The tokenizer as llguidance takes it (structured output, coordinator/serving/constraints.py)."""
        raise InvalidArgument(f"model {self.name!r} has no tokenizer in the store: structured output (json_schema, "
                              "json_object, regex, grammar) needs one")


class TextModel(TokenModel):
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        if not (path / "tokenizer_config.json").is_file():
            raise FailedPrecondition(f"model at {path} has no tokenizer: it cannot serve text")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self._token_texts: dict[int, str] = {}
        self._guidance: Any = None
        self._guidance_lock = threading.Lock()
        super().__init__(path)

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[Any], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """`messages`: chat turns (generation.Turn); `tools` (OpenAI's shape) go to the template, which must
        take them."""
        template = self.tokenizer.chat_template
        if not template:
            raise InvalidArgument("messages: this model has no chat template; send a prompt instead")
        if tools and "tools" not in template:
            raise InvalidArgument(f"tools: model {self.name!r}'s chat template does not take tools (the model was "
                                  "not taught to call them); send no tools, or serve a model whose template does")
        conversation = []
        for m in messages:
            turn: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": _arguments(c.arguments)}} for c in m.tool_calls]
            if m.tool_call_id:
                turn["tool_call_id"] = m.tool_call_id
            conversation.append(turn)
        try:
            ids = self.tokenizer.apply_chat_template(conversation, tools=tools or None, add_generation_prompt=True,
                                                     tokenize=True)
        except jinja2.TemplateError as exc:  # the template's own rule (roles in order, one call, ...)
            raise InvalidArgument(f"messages: model {self.name!r}'s chat template refuses them: "
                                  f"{str(exc)[:200]}") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def encode_batch(self, texts: list[str], max_tokens: int, truncate: bool = False) -> tuple[list[list[int]], int]:
        """Token ids of each text, and how many texts were cut: a text over `max_tokens` (the model's
        positions) is cut to them with `truncate` (its special tokens kept, as sentence-transformers does),
        else refused, naming the text and its tokens."""
        ids = [list(i) for i in self.tokenizer(texts, verbose=False)["input_ids"]]
        long = [i for i, row in enumerate(ids) if len(row) > max_tokens]
        if long and not truncate:
            raise InvalidArgument(f"texts[{long[0]}] is {len(ids[long[0]])} tokens; model {self.name!r} takes at "
                                  f"most {max_tokens}: shorten it, or ask for truncation (the SDK's embed(..., "
                                  "truncate=True), `coordinator embed --truncate`, KServe's input 'truncate')")
        if long:
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=max_tokens)["input_ids"]
            for i, row in zip(long, cut, strict=True):
                ids[i] = list(row)
        return ids, len(long)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def guidance(self) -> Any:
        """Built at the first structured request (about 0.3 s, off the event loop: `prepare` runs in a thread),
        covering the model's whole vocabulary."""
        with self._guidance_lock:
            if self._guidance is None:
                import llguidance.hf

                self._guidance = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size or None)
            return self._guidance

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            if len(self._token_texts) >= 65_536:
                self._token_texts.clear()
            text = self._token_texts[token_id] = str(self.tokenizer.decode([token_id]))
        return text


def _arguments(text: str) -> Any:
    """A call's arguments as templates take them: the JSON value (text that is not JSON stays text)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class TextStream:
    """Turns generated token ids into text pieces as they come, holding back what could still turn out to
    be part of a stop sequence or of an incomplete UTF-8 character.

    Incremental: each token decodes only a short window of ids (those since the last text given out, and the
    one before them, so that tokenizers which drop a leading space at the start of a decode drop it from the
    context, not from the new text), and stop sequences are matched in a window of their own length
    (coordinator/serving/stops.py). The work per token does not grow with the completion."""

    def __init__(self, model: TokenModel, stop: tuple[str, ...] = ()) -> None:
        self.model = model
        self.ids: list[int] = []  # the window: ids[:read] decode to text already given to the stop matcher
        self.read = 0
        self.matcher = StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def push(self, token_id: int, match: bool = True) -> str:
        """The new text this token makes final ('' if none yet); sets `stopped` on a stop sequence. With
        match=False (before min_tokens) its text cannot begin or complete a stop sequence."""
        self.ids.append(token_id)
        return self.matcher.push(self._detokenize(final=False), match)

    def flush(self) -> str:
        """At the end: what was held back and is not a stop sequence."""
        return self.matcher.push(self._detokenize(final=True), match=False) if not self.stopped else ""

    def _detokenize(self, final: bool) -> str:
        context = self.model.decode(self.ids[: self.read]) if self.read else ""
        text = self.model.decode(self.ids)
        # an incomplete UTF-8 character decodes to U+FFFD: wait for the bytes that complete it, but only as
        # long as they could (a character is at most 4 bytes, so at most 4 tokens)
        if not final and (len(text) <= len(context) or text.endswith("\ufffd")) \
                and len(self.ids) - self.read < MAX_PENDING_TOKENS:
            return ""
        del self.ids[: self.read]  # what is before the new context is never decoded again
        self.read = len(self.ids)
        return text[len(context):]


_LOADED: dict[tuple[str, tuple[tuple[str, int, int], ...]], TextModel] = {}
MAX_LOADED = 16
# one load at a time: transformers' first import is not safe from two threads at once (a standby's warm-up and
# its first deployment as leader), and a second load of the same files waits for the first's result
_LOADING = threading.Lock()


def text_model(path: Path) -> TextModel:
    """The model's tokenizer, loaded once per process while its files stay as they are (a standby coordinator
    loads them before it is elected, so taking over costs no tokenizer load: coordinator/ha/serve.py)."""
    files = tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in path.glob("*token*")
                         if f.is_file()))
    key = (str(path.resolve()), files)
    with _LOADING:
        found = _LOADED.get(key)
        if found is None:
            found = TextModel(path)
            if len(_LOADED) >= MAX_LOADED:
                _LOADED.pop(next(iter(_LOADED)))
            _LOADED[key] = found
    return found

