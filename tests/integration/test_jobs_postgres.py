"""Jobs on PostgreSQL (issue 29.5), against a real server the tests start (tests/postgres.py): the store does what
the SQLite one does; items are claimed under a lease, so two coordinators never both run or finish one item, a
deposed one's late result is refused, and a dead one's claims are taken when they lapse; a database that cannot
be reached or refuses is said in one line naming it."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
import time

import pytest

from coordinator.config import database_name
from coordinator.jobs import postgres
from coordinator.jobs.postgres import JobsUnavailable, PostgresJobs
from coordinator.jobs.store import NewItem
from shardline.client import Client
from shardline.v1 import coordinator_pb2
from tests.integration.test_jobs import cluster  # noqa: F401 - the fixture
from tests.unit.test_jobs_and_cache import keeps_results_and_expires_them, pages_stop_at_their_byte_cap


def new_job(store: PostgresJobs, n: int) -> None:
    items = [NewItem(f"c{i}", coordinator_pb2.JobItem(custom_id=f"c{i}").SerializeToString(), False)
             for i in range(n)]
    assert store.create("job-1", "alice", "", items, ["m@1"], now=100.0, max_unfinished=10)


def test_the_postgres_store_does_what_the_sqlite_one_does(jobs_db):
    store = PostgresJobs(jobs_db)
    keeps_results_and_expires_them(store)
    store.close()
    again = PostgresJobs(jobs_db)  # a second coordinator (or a restart) finds what the first stored
    assert again.job("job-1").state == "expired"
    again.close()


def test_a_page_of_large_results_stops_at_its_byte_cap_on_postgres(jobs_db):
    store = PostgresJobs(jobs_db)
    pages_stop_at_their_byte_cap(store)
    store.close()


def test_two_coordinators_never_run_or_finish_one_item(jobs_db):
    a, b = PostgresJobs(jobs_db), PostgresJobs(jobs_db)
    try:
        new_job(a, 3)
        assert a.claim("job-1", 0) and a.claim("job-1", 0)  # its own claim: taken again (renewed)
        assert not b.claim("job-1", 0)  # held by a
        assert [i for i, _, _ in b.pending("job-1", -1, 10)] == [1, 2]  # b is not offered a's item
        assert not b.finish_item("job-1", 0, "done", b"b's", cached=False)  # nor may it write its result
        assert a.finish_item("job-1", 0, "done", b"a's", cached=False)
        assert not b.claim("job-1", 0)  # finished: nobody claims it again
        assert not a.finish_item("job-1", 1, "done", b"unclaimed", cached=False)  # a claim comes first
        assert b.claim("job-1", 1)
        b.release()  # b stops: its claims go at once
        assert a.claim("job-1", 1)
        assert [r.result for r in a.items("job-1", 0, 3)] == [b"a's", None, None]
        assert a.remaining("job-1") == 2 and b.remaining("job-1") == 2  # whoever holds them
    finally:
        a.close()
        b.close()


def test_of_runners_claiming_one_item_at_the_same_moment_exactly_one_gets_it(jobs_db):
    stores = [PostgresJobs(jobs_db) for _ in range(6)]
    try:
        new_job(stores[0], 1)
        start = threading.Barrier(len(stores))

        def claim(store: PostgresJobs) -> bool:
            start.wait(10)
            return store.claim("job-1", 0)

        with concurrent.futures.ThreadPoolExecutor(len(stores)) as pool:
            claimed = list(pool.map(claim, stores))
        assert sorted(claimed) == [False] * (len(stores) - 1) + [True]
        finish = threading.Barrier(len(stores))

        def commit(store: PostgresJobs) -> bool:
            finish.wait(10)
            return store.finish_item("job-1", 0, "done", store.runner.encode(), cached=False)

        with concurrent.futures.ThreadPoolExecutor(len(stores)) as pool:
            committed = list(pool.map(commit, stores))
        assert committed == claimed  # only the holder's result is written
        holder = stores[claimed.index(True)]
        assert [r.result for r in holder.items("job-1", 0, 1)] == [holder.runner.encode()]
    finally:
        for store in stores:
            store.close()


def test_a_lapsed_claim_is_taken_and_the_late_result_of_its_old_holder_refused(jobs_db, monkeypatch):
    """A deposed leader (paused past its claims) wakes up with a result: the item is its successor's now."""
    monkeypatch.setattr(postgres, "CLAIM_S", 1.5)
    old, new = PostgresJobs(jobs_db), PostgresJobs(jobs_db)
    try:
        new_job(old, 2)
        assert old.claim("job-1", 0) and old.claim("job-1", 1)
        assert not new.claim("job-1", 0)
        old.renew()  # renewed: still its own 1.5 s on
        assert not new.claim("job-1", 0)
        time.sleep(2.0)  # not renewed: lapsed
        assert [i for i, _, _ in new.pending("job-1", -1, 10)] == [0, 1]
        assert new.claim("job-1", 0)
        assert not old.finish_item("job-1", 0, "done", b"late", cached=False)  # refused: the item is new's
        assert new.finish_item("job-1", 0, "done", b"new's", cached=False)
        assert old.finish_item("job-1", 1, "done", b"lapsed, not taken", cached=False)  # nobody took it: kept
        assert [r.result for r in new.items("job-1", 0, 2)] == [b"new's", b"lapsed, not taken"]
    finally:
        old.close()
        new.close()


def test_the_unfinished_jobs_limit_holds_across_coordinators(jobs_db):
    a, b = PostgresJobs(jobs_db), PostgresJobs(jobs_db)
    try:
        one = [NewItem("c", coordinator_pb2.JobItem(custom_id="c").SerializeToString(), False)]
        assert a.create("job-a", "alice", "", one, ["m@1"], now=1.0, max_unfinished=1)
        assert not b.create("job-b", "bob", "", one, ["m@1"], now=2.0, max_unfinished=1)
        assert b.unfinished() == ["job-a"]
    finally:
        a.close()
        b.close()


def test_a_database_that_does_not_answer_or_refuses_is_named_in_one_line(jobs_db):
    with pytest.raises(JobsUnavailable, match=r"the jobs database postgresql://127\.0\.0\.1:1/jobs cannot be "
                                              r"reached: .*(refused|failed)"):
        PostgresJobs("postgresql://127.0.0.1:1/jobs")
    wrong_user = jobs_db.replace("postgresql://postgres:@", "postgresql://mallory:secret@")
    with pytest.raises(JobsUnavailable, match=r'postgresql://mallory@.*cannot be reached: .*"mallory" does not '
                                              "exist") as err:
        PostgresJobs(wrong_user)
    assert "secret" not in err.value.message  # a password never shows
    assert database_name("postgresql://u:pw@db.example:5433/jobs") == "postgresql://u@db.example:5433/jobs"
    assert database_name("postgresql://u@/jobs?host=/run/pg") == "postgresql://u@/run/pg/jobs"


@pytest.mark.parametrize("url, says", [
    ("postgresql://127.0.0.1:1/jobs", "error: the jobs database postgresql://127.0.0.1:1/jobs cannot be reached"),
    ("mysql://db/jobs", "jobs_db must be a postgresql:// URL"),
])
def test_serve_with_a_jobs_db_it_cannot_use_exits_1_in_one_line(url, says, store):
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", "serve", "--store", str(store.root), "--model",
                           "tiny-llama", "--port", "0", "--no-http", "--jobs-db", url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_job_goes_on_under_the_next_coordinator_sharing_its_database(cluster, jobs_db, loop):  # noqa: F811
    """A coordinator stops mid-job (its claims released); the next one, on the same database, finishes the job
    with the interactive results, running only the items that had no result."""
    from tests.integration.test_jobs import PROMPTS, items

    greedy = dict(max_tokens=24, temperature=0, ignore_eos=True)
    first = cluster(jobs_db=jobs_db, job_concurrency=2)
    with Client(first.address, timeout=60) as client:
        job_id = client.submit_job(items(PROMPTS[:24], **greedy))
        deadline = time.monotonic() + 60
        while client.get_job(job_id).done < 4:
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
    loop.run(first.stop())
    reader = PostgresJobs(jobs_db)
    done_first = reader.job(job_id).counts.get("done", 0)
    reader.close()
    assert 4 <= done_first < 24
    second = cluster(jobs_db=jobs_db)
    with Client(second.address, timeout=60) as client:
        status = client.wait_job(job_id, timeout=120)
        assert (status.state, status.done, status.failed) == ("completed", 24, 0)
        ran = sum(r.requests for d in client.cluster_status().deployments for r in d.replicas)
        assert ran == 24 - done_first  # only the items without a result ran again
        interactive = [client.generate(p, **greedy).token_ids for p in PROMPTS[:24]]
        assert [list(r.token_ids) for r in client.job_results(job_id)] == interactive


def test_a_jobs_database_that_goes_away_is_said_and_jobs_go_on_when_it_is_back(cluster, tmp_path):  # noqa: F811
    """PostgreSQL stopped under a running coordinator: job calls answer UNAVAILABLE naming the database, the
    cluster's status says why (and serves), generation goes on; started again, jobs work without a restart."""
    from shardline.errors import Unavailable
    from tests.integration.test_jobs import PROMPTS, items
    from tests.postgres import LocalPostgres

    greedy = dict(max_tokens=4, temperature=0, ignore_eos=True)
    pg = LocalPostgres(tmp_path / "pg")
    try:
        coordinator = cluster(jobs_db=pg.database())
        with Client(coordinator.address, timeout=30) as client:
            first = client.submit_job(items(PROMPTS[:3], **greedy))
            assert client.wait_job(first, timeout=60).done == 3
            pg.stop()
            for _ in range(2):  # its connection ended by the server's stop; then none can be made
                with pytest.raises(Unavailable, match=r"the jobs database postgresql://postgres@/tmp/.*/t_\w+ "
                                                      r"cannot be reached: \w+"):
                    client.submit_job(items(PROMPTS[:2], **greedy))
            status = client.cluster_status()
            assert "cannot be reached" in status.jobs_off and status.ready
            assert len(client.generate(PROMPTS[0], **greedy).token_ids) == 4  # serving goes on
            pg = LocalPostgres(tmp_path / "pg")
            deadline = time.monotonic() + 5  # UNAVAILABLE says: try again (a failed connect is not retried
            while True:  # for a second, so that status calls do not queue on connects)
                try:
                    again = client.submit_job(items(PROMPTS[:2], **greedy))
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, "jobs did not come back with the database"
                    time.sleep(0.2)
            assert client.wait_job(again, timeout=60).done == 2
            assert client.get_job(first).done == 3 and client.cluster_status().jobs_off == ""
    finally:
        pg.stop()
