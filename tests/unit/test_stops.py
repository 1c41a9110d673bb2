"""The windowed stop matcher and incremental detokenization (no tokenizer, no sockets)."""

from __future__ import annotations

import random
import time

from coordinator.serving.stops import StopMatcher
from coordinator.serving.textmodel import TextStream


def feed(stops, pieces, match=True):
    m = StopMatcher(stops)
    out = "".join(m.push(p, match) for p in pieces)
    return out + m.flush(), m.stopped


def reference(stops, text):
    """The text up to the stop sequence that completes first (of two ending together, the longer)."""
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) != -1]
    return (text[: min(hits)[1]], True) if hits else (text, False)


def test_a_stop_split_across_pieces_is_found_and_nothing_of_it_leaks():
    m = StopMatcher(["lo Wo"])
    assert m.push("Hel") == "He"         # "l" could begin the stop sequence: held
    assert m.push("lo W") == "l"         # "lo W" could still become the stop sequence
    assert m.push("orld") == "" and m.stopped
    assert m.flush() == ""


def test_held_text_that_never_becomes_a_stop_is_released():
    m = StopMatcher(["STOP"])
    assert m.push("a ST") == "a "
    assert m.push("OR") == "STOR"
    assert m.push("ST") == ""
    assert m.flush() == "ST" and not m.stopped


def test_overlapping_candidates():
    assert feed(["aab"], list("aaaab")) == ("aa", True)
    assert feed(["abc", "bcd"], list("xabcd")) == ("x", True)
    assert feed(["bcd", "abce"], list("xabcd")) == ("xa", True)
    assert feed(["abab"], ["ab", "a", "bab"]) == ("", True)
    assert feed(["aXa", "Xb"], ["a", "X", "b"]) == ("a", True)  # "aX" was held for "aXa"


def test_random_text_pieces_and_stops_match_a_whole_text_search():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 40)))
        stops = ["".join(rng.choice("abc ") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(1, 4))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert feed(stops, pieces) == reference(stops, text), (text, stops, pieces)


def test_before_min_tokens_nothing_is_held_and_nothing_stops():
    m = StopMatcher(["end"])
    assert m.push("the en", match=False) == "the en"
    assert m.push("d", match=True) == "d" and not m.stopped  # a stop cannot begin in text given out before
    assert m.push(" en") == " " and m.push("d!") == "" and m.stopped


def test_the_work_per_piece_does_not_grow_with_the_text():
    stops = ["x" * 255 + "y", *("z" * 200 + str(i) for i in range(15))]  # long stops that almost match
    m = StopMatcher(stops)
    pieces = ["x" * 5] * 20_000
    start = time.perf_counter()
    out = sum(len(m.push(p)) for p in pieces)
    elapsed = time.perf_counter() - start
    assert out == 100_000 - 255 and not m.stopped
    assert elapsed < 2.0, elapsed
    assert len(m.held) == 255


class ByteModel:
    """A byte-level fake tokenizer: each id is one byte; decode replaces incomplete UTF-8 with U+FFFD."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def decode(self, ids):
        self.calls.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


def stream_text(ids, stops=(), model=None):
    s = TextStream(model or ByteModel(), tuple(stops))
    pieces = [s.push(i) for i in ids]
    return pieces, s.flush(), s.stopped


def test_a_character_split_across_tokens_is_given_out_whole():
    ids = list("é€😀a".encode())
    pieces, rest, _ = stream_text(ids)
    assert "".join(pieces) + rest == "é€😀a"
    assert all("\ufffd" not in p for p in pieces)


def test_invalid_bytes_do_not_stall_the_stream():
    ids = [0x80] * 40 + list(b"ok")
    pieces, rest, _ = stream_text(ids)
    assert "".join(pieces) + rest == bytes(ids).decode("utf-8", errors="replace")
    assert sum(1 for p in pieces if p) >= 8  # given out as it comes, not all at the end


def test_detokenizing_decodes_only_a_window():
    model = ByteModel()
    ids = list(("word " * 2000).encode())
    pieces, rest, _ = stream_text(ids, ["never"], model)
    assert "".join(pieces) + rest == "word " * 2000
    assert max(model.calls) <= 8


def test_a_stop_sequence_over_tokens_with_multibyte_characters():
    ids = list("prix: 5€ net".encode())
    pieces, rest, stopped = stream_text(ids, ["5€"])
    assert stopped and "".join(pieces) + rest == "prix: "


def test_a_streams_wait_for_its_next_token_is_bounded_except_a_queued_jobs_item():
    """coordinator/serving/generation.py next_token: an interactive stream (queued or running) fails after
    the wait, and leaves the scheduler (ended); a background stream still queued waits its turn; an item that
    comes in time is returned."""
    import asyncio

    from coordinator.serving.generation import next_token
    from coordinator.serving.streams import Sampling, Stream, StreamState
    from shardline.errors import Unavailable

    async def scenario() -> None:
        interactive = Stream("a", [1], Sampling(), 4, frozenset())
        failure = await next_token(interactive, 0.05)
        assert isinstance(failure, Unavailable) and "no token came for 0.05 s while the stream was queued" \
            in str(failure) and interactive.state is StreamState.FAILED and interactive.done
        job = Stream("b", [1], Sampling(), 4, frozenset(), background=True)
        waiting = asyncio.ensure_future(next_token(job, 0.05))
        await asyncio.sleep(0.3)  # six waits past the bound: still waiting
        assert not waiting.done() and job.state is StreamState.QUEUED
        job.tokens.put_nowait(42)
        assert await waiting == 42
        job.move(StreamState.RUNNING)  # admitted: its wait is bounded as any other's
        assert isinstance(await next_token(job, 0.05), Unavailable) and job.state is StreamState.FAILED

    asyncio.run(scenario())
