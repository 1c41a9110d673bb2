"""Quotas per API key: how many streams a key may have open at once, and how many requests it may start per
second (a token bucket holding one second's worth). Values come from the API keys file (shardline/auth.py:
per role under "quotas", per key beside its name); 0 is no limit. Over a quota, a call is refused at once
with RESOURCE_EXHAUSTED naming the limit and when to retry (HTTP: 429 with Retry-After), before it takes a
slot or a KV block: one busy key cannot take the whole cluster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from shardline.auth import KeyEntry
from shardline.errors import ResourceExhausted

MAX_TRACKED_KEYS = 100_000  # buckets of keys unseen for a minute are dropped past this many


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.open: dict[str, int] = {}                     # key name -> streams open now
        self.buckets: dict[str, tuple[float, float]] = {}  # key name -> (tokens, when last refilled)

    @contextmanager
    def admitted(self, key: KeyEntry | None, resumed: bool = False) -> Iterator[None]:
        """The call runs within the key's quotas (no key, or no quota: always); ResourceExhausted otherwise. A
        resumed stream (resume_token_ids) is not charged a request: it is one its key started already."""
        if key is None or not (key.max_streams or key.requests_per_s):
            yield
            return
        open_now = self.open.get(key.name, 0)
        if key.max_streams and open_now >= key.max_streams:  # first: a refused call takes no rate token
            raise ResourceExhausted(f"key {key.name!r} has {open_now} calls open, its quota (max_streams "
                                    f"{key.max_streams} in the API keys file): retry in 1 s, or when one ends")
        if key.requests_per_s and not resumed:
            self._take(key)
        self.open[key.name] = open_now + 1
        try:
            yield
        finally:
            left = self.open[key.name] - 1
            if left:
                self.open[key.name] = left
            else:
                del self.open[key.name]

    def _take(self, key: KeyEntry) -> None:
        now, rate = self.clock(), key.requests_per_s
        capacity = max(1.0, rate)  # one second's worth: a burst of `rate` requests, then `rate` a second
        tokens, last = self.buckets.get(key.name, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens < 1.0:
            wait = math.ceil((1.0 - tokens) / rate * 10) / 10
            self.buckets[key.name] = (tokens, now)
            raise ResourceExhausted(f"key {key.name!r} is over its quota of {rate:g} requests per second "
                                    f"(requests_per_s in the API keys file): retry in {wait:g} s")
        self.buckets[key.name] = (tokens - 1.0, now)
        if len(self.buckets) > MAX_TRACKED_KEYS:
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
