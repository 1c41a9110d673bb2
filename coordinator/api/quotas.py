"""Quotas per API key: how many streams a key may have open at once, how many requests it may start per
second (a token bucket holding one second's worth), and how many tokens (prompt and generated, or an
embedding's input) it may use per minute (a bucket holding one minute's worth, charged with what each call
used when it ends; a key in debt is refused until the bucket has refilled past zero). Values come from the
API keys file (shardline/auth.py: per role under "quotas", per key beside its name); 0 is no limit. Over a
quota, a call is refused at once with RESOURCE_EXHAUSTED naming the limit and when to retry (HTTP: 429 with
Retry-After), before it takes a slot or a KV block: one busy key cannot take the whole cluster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardline.auth import KeyEntry
from shardline.errors import ResourceExhausted

if TYPE_CHECKING:
    from coordinator.serving.generation import Piece

MAX_TRACKED_KEYS = 100_000  # buckets of keys unseen for a minute are dropped past this many


@dataclass
class Usage:
    """What a call used, told to its quota as it runs (charged against tokens_per_min when it ends)."""

    tokens: int = 0


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.open: dict[str, int] = {}                     # key id -> streams open now
        self.buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when last refilled)
        self.token_buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens left this minute, when)

    @contextmanager
    def admitted(self, key: KeyEntry | None, resumed: bool = False) -> Iterator[Usage]:
        """The call runs within the key's quotas (no key, or no quota: always); ResourceExhausted otherwise. A
        resumed stream (resume_token_ids) is not charged a request: it is one its key started already. The
        caller adds the tokens the call uses to the Usage it is given."""
        usage = Usage()
        if key is None or not (key.max_streams or key.requests_per_s or key.tokens_per_min):
            yield usage
            return
        open_now = self.open.get(key.id, 0)
        if key.max_streams and open_now >= key.max_streams:  # first: a refused call takes no rate token
            raise ResourceExhausted(f"key {key.name!r} has {open_now} calls open, its quota (max_streams "
                                    f"{key.max_streams} in the API keys file): retry in 1 s, or when one ends")
        if key.tokens_per_min:
            self._check_tokens(key)
        if key.requests_per_s and not resumed:
            self._take(key)
        self.open[key.id] = open_now + 1
        try:
            yield usage
        finally:
            left = self.open[key.id] - 1
            if left:
                self.open[key.id] = left
            else:
                del self.open[key.id]
            if key.tokens_per_min and usage.tokens:
                tokens, now = self._tokens_now(key)
                self.token_buckets[key.id] = (tokens - usage.tokens, now)

    def _tokens_now(self, key: KeyEntry) -> tuple[float, float]:
        """The key's token bucket now: refilled at tokens_per_min / 60 a second, up to one minute's worth."""
        now, per_min = self.clock(), key.tokens_per_min
        tokens, last = self.token_buckets.get(key.id, (per_min, now))
        return min(per_min, tokens + (now - last) * per_min / 60), now

    def _check_tokens(self, key: KeyEntry) -> None:
        tokens, now = self._tokens_now(key)
        self.token_buckets[key.id] = (tokens, now)
        if tokens <= 0:
            wait = math.ceil((1 - tokens) / (key.tokens_per_min / 60) * 10) / 10
            raise ResourceExhausted(f"key {key.name!r} is over its quota of {key.tokens_per_min:g} tokens per "
                                    f"minute (tokens_per_min in the API keys file): retry in {wait:g} s")
        if len(self.token_buckets) > MAX_TRACKED_KEYS:
            self.token_buckets = {k: v for k, v in self.token_buckets.items() if now - v[1] < 60}

    def _take(self, key: KeyEntry) -> None:
        now, rate = self.clock(), key.requests_per_s
        capacity = max(1.0, rate)  # one second's worth: a burst of `rate` requests, then `rate` a second
        tokens, last = self.buckets.get(key.id, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens < 1.0:
            wait = math.ceil((1.0 - tokens) / rate * 10) / 10
            self.buckets[key.id] = (tokens, now)
            raise ResourceExhausted(f"key {key.name!r} is over its quota of {rate:g} requests per second "
                                    f"(requests_per_s in the API keys file): retry in {wait:g} s")
        self.buckets[key.id] = (tokens - 1.0, now)
        if len(self.buckets) > MAX_TRACKED_KEYS:
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}


def charge(usage: Usage, piece: Piece, resumed: bool = False) -> None:
    """Count a generation's piece against its key's tokens: the prompt once (on the first piece; a resumed
    stream's prompt was counted when it began), every generated token; an answer from the result cache costs
    nothing."""
    if piece.cached:
        return
    if piece.model and not resumed:  # only the first piece names the version
        usage.tokens += piece.prompt_tokens
    usage.tokens += len(piece.token_ids)
