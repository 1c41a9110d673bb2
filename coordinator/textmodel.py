"""The model's text side on the coordinator: tokenizer, chat template, context length, stop tokens, and
incremental detokenization with stop sequences."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardline.errors import FailedPrecondition, InvalidArgument


class TextModel:
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        if not (path / "tokenizer_config.json").is_file():
            raise FailedPrecondition(f"model at {path} has no tokenizer: it cannot serve text")
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        self.context_tokens = int(config.get("max_position_embeddings") or config.get("n_positions") or 0)
        eos = config.get("eos_token_id", self.tokenizer.eos_token_id)
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.stop_ids = frozenset(int(i) for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None)

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise InvalidArgument("messages: this model has no chat template; send a prompt instead")
        ids = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def encode_batch(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        """Token ids of each text, truncated to the model's positions (as sentence-transformers does)."""
        return [list(ids) for ids in self.tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


@dataclass
class TextStream:
    """Turns generated token ids into text pieces as they come, holding back what could still turn out to
    be part of a stop sequence or an incomplete UTF-8 character."""

    model: TextModel
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already given out
    stopped: bool = False

    def push(self, token_id: int) -> str:
        """The new text this token makes final ('' if none yet); sets `stopped` on a stop sequence."""
        self.ids.append(token_id)
        text = self.model.decode(self.ids)
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.stopped = True
                return self._take(text[:at])
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(text[: len(text) - hold])

    def flush(self) -> str:
        """At the end: what was held back and is not a stop sequence."""
        return "" if self.stopped else self._take(self.model.decode(self.ids))

    def _take(self, text: str) -> str:
        piece = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        return piece
