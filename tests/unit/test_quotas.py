"""Quotas per API key (coordinator/api/quotas.py, pure with a clock of the test's) and how the keys file gives
them (shardline/auth.py parse_keys): role defaults, a key's own values, and bad values refused naming them."""

from __future__ import annotations

import json
import re

import pytest

from coordinator.api.quotas import Quotas
from shardline.auth import KeyEntry, parse_keys
from shardline.errors import ResourceExhausted

DIGEST = "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_streams_open_at_once_are_bounded_and_freed_when_they_end():
    quotas = Quotas()
    key = KeyEntry("busy", "client", DIGEST, max_streams=2)
    with quotas.admitted(key), quotas.admitted(key):
        with pytest.raises(ResourceExhausted, match="key 'busy' has 2 calls open, its quota .max_streams 2"), \
                quotas.admitted(key):
            pass
        with quotas.admitted(KeyEntry("calm", "client", "cd" * 32, max_streams=2)):  # another key: its own
            pass
    with quotas.admitted(key):  # they ended: room again
        pass
    assert quotas.open == {}


def test_requests_per_second_is_a_bucket_of_one_seconds_worth():
    clock = Clock()
    quotas = Quotas(clock)
    key = KeyEntry("rated", "client", DIGEST, requests_per_s=2)
    for _ in range(2):
        with quotas.admitted(key):
            pass
    with pytest.raises(ResourceExhausted, match=r"quota of 2 requests per second .*retry in 0.5 s"), \
            quotas.admitted(key):
        pass
    clock.now += 0.5
    with quotas.admitted(key):
        pass
    with quotas.admitted(None), quotas.admitted(KeyEntry("free", "client", DIGEST)):  # no key, no quota: free
        pass


def test_tokens_per_minute_are_charged_as_used_and_refused_while_the_key_is_in_debt():
    """A call may take the bucket below zero (its use is known only as it runs); the next is refused until a
    minute's rate has refilled it past zero. The prompt is charged once, a resumed stream's not again, an
    answer from the result cache not at all."""
    from coordinator.api.quotas import charge
    from coordinator.serving.generation import FinishReason, Piece

    clock = Clock()
    quotas = Quotas(clock)
    key = KeyEntry("metered", "client", DIGEST, tokens_per_min=600)  # 10 a second
    with quotas.admitted(key) as usage:
        charge(usage, Piece("a", [1, 2], prompt_tokens=500, model="m@1"))
        charge(usage, Piece("b", [3] * 198, FinishReason.LENGTH, prompt_tokens=500, completion_tokens=200))
    assert usage.tokens == 700  # the prompt once, 200 generated
    with pytest.raises(ResourceExhausted, match=r"quota of 600 tokens per minute .*retry in 10.1 s"), \
            quotas.admitted(key):
        pass
    clock.now += 10.1
    with quotas.admitted(key) as usage:
        charge(usage, Piece("c", [4], prompt_tokens=500, model="m@1"), resumed=True)
        charge(usage, Piece("cached", [5, 6], prompt_tokens=9, model="m@1", cached=True))
    assert usage.tokens == 1


def keys_file(**extra: object) -> str:
    entry = {"name": "app", "role": "client", "sha256": DIGEST}
    return json.dumps({"keys": [{**entry, **extra.pop("entry", {})}], **extra})


def test_the_keys_file_gives_role_defaults_and_a_keys_own_values():
    keys = parse_keys(keys_file(quotas={"client": {"max_streams": 8, "requests_per_s": 5}}), "f")
    assert (keys[f"sha256:{DIGEST}"].max_streams, keys[f"sha256:{DIGEST}"].requests_per_s) == (8, 5.0)
    keys = parse_keys(keys_file(quotas={"client": {"max_streams": 8}}, entry={"max_streams": 64}), "f")
    assert (keys[f"sha256:{DIGEST}"].max_streams, keys[f"sha256:{DIGEST}"].requests_per_s) == (64, 0.0)


@pytest.mark.parametrize("extra, words", [
    (dict(entry={"max_streams": -1}), "key 'app': max_streams must be a whole number from 0"),
    (dict(entry={"max_streams": 2.5}), "max_streams must be a whole number"),
    (dict(entry={"requests_per_s": 1e12}), "requests_per_s must be a number from 0 (no limit) to 1e+06, got 10000"),
    (dict(entry={"requests_per_s": True}), "requests_per_s must be a number"),
    (dict(quotas={"client": {"max_tokens": 5}}), "quotas.client: 'max_tokens' is not a quota"),
    (dict(quotas={"root": {"max_streams": 5}}), "quotas must be an object keyed by role"),
])
def test_a_bad_quota_is_refused_naming_it(extra, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_keys(keys_file(**extra), "f")


def test_a_call_refused_for_its_streams_takes_no_rate_token_and_a_resume_is_not_charged():
    clock = Clock()
    quotas = Quotas(clock)
    key = KeyEntry("both", "client", DIGEST, max_streams=1, requests_per_s=1)
    with quotas.admitted(key):
        for _ in range(3):  # refused for its streams: no token taken
            with pytest.raises(ResourceExhausted, match="max_streams"), quotas.admitted(key):
                pass
    clock.now += 1.0
    with quotas.admitted(key):  # the token refilled and was not spent by the refusals
        pass
    with quotas.admitted(key, resumed=True):  # a resumed stream: its key started it already
        pass
