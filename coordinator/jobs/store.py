"""Where jobs live: by default one SQLite file in the store directory (`jobs.sqlite3`, `SqliteJobs`), written by
one coordinator at a time; with standby coordinators, a PostgreSQL database they share
(coordinator/jobs/postgres.py, `--jobs-db postgresql://...`), where a runner claims each item before running it.
The SQL is one piece (`JobStore`) for both.

Schema: `jobs` (one row per job: owner, label, state, times, item count) and `items` (one row per item: its
request as the JobItem protobuf, pinned to a model version and a seed when it was submitted; its state; its
result as a JobItemResult protobuf). An item's result is committed before the item counts as done, so after a
crash only the items that had not finished run again. SQLite: WAL journal with synchronous=NORMAL: a committed
transaction survives the process being killed; a job's submission commits with synchronous=FULL, so that an
acknowledged SubmitJob survives a power loss too (an item's result, cheap to compute again, does not wait for
the disk).

Every method is synchronous and meant to run on one thread (JobRunner's), never on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, label TEXT NOT NULL, state TEXT NOT NULL,
  created REAL NOT NULL, finished REAL NOT NULL DEFAULT 0, expires REAL NOT NULL DEFAULT 0,
  total INTEGER NOT NULL, models TEXT NOT NULL, message TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS items (
  job TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL, request BLOB NOT NULL,
  seeded_here INTEGER NOT NULL, state TEXT NOT NULL, result BLOB, cached INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (job, idx)) WITHOUT ROWID;
"""
UNFINISHED = ("queued", "running")
TOMBSTONE_DAYS = 30  # an expired job's row (no results) is kept this long, to say when it expired


class JobsLocked(Exception):
    """Another coordinator uses this jobs database."""


@dataclass(frozen=True)
class JobRow:
    job_id: str
    owner: str
    label: str
    state: str
    created: float
    finished: float
    expires: float
    total: int
    models: tuple[str, ...]
    message: str
    counts: dict[str, int]
    cached: int


@dataclass(frozen=True)
class NewItem:
    custom_id: str
    request: bytes      # a JobItem, pinned to name@version (and a seed when sampled without one)
    seeded_here: bool   # the seed was chosen at submission (its result is not cached: nobody asks again)


@dataclass(frozen=True)
class ItemRow:
    index: int
    custom_id: str
    state: str
    result: bytes | None
    cached: bool


class JobStore:
    """The jobs' SQL, one piece for both databases; a subclass opens the connection and says how a statement
    runs (`_run`), how a transaction is held (`_transaction`) and how items are claimed."""

    where = ""  # the database, as messages name it
    claims = False  # whether items are claimed (a database shared by coordinators): `claim` is then called

    def _run(self, sql: str, args: Sequence[object] = ()) -> Any:
        """Execute `sql` (`?` placeholders); a cursor to iterate."""
        raise NotImplementedError

    def _run_many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        raise NotImplementedError

    def _transaction(self, write_lock: bool = False, snapshot: bool = False) -> contextlib.AbstractContextManager[None]:
        """One transaction; with `write_lock`, the only writer from its start (a count checked in it holds);
        with `snapshot`, its reads see one state (SQLite's always do)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- claims: one coordinator runs an item at a time -----------------------------------------------------
    def claim(self, job_id: str, index: int) -> bool:
        """Take the item to run it: False when another coordinator holds it (its claim has not lapsed)."""
        return True  # SQLite: one coordinator holds the file

    def renew(self) -> None:
        """Extend this runner's claims (called every few seconds while items run)."""

    def release(self) -> None:
        """Let go of this runner's claims (a stop: another coordinator may take the items at once)."""

    def create(self, job_id: str, owner: str, label: str, items: list[NewItem], models: list[str],
               now: float, max_unfinished: int) -> bool:
        """Store a new job, unless `max_unfinished` jobs are unfinished already (then False); durable when it
        returns True."""
        with self._transaction(write_lock=True):
            if self.unfinished_count() >= max_unfinished:
                return False
            self._run("INSERT INTO jobs (id, owner, label, state, created, total, models) VALUES "
                      "(?, ?, ?, 'queued', ?, ?, ?)", (job_id, owner, label, now, len(items), ",".join(models)))
            self._run_many("INSERT INTO items (job, idx, custom_id, request, seeded_here, state) VALUES "
                           "(?, ?, ?, ?, ?, 'pending')",
                           [(job_id, i, it.custom_id, it.request, int(it.seeded_here)) for i, it in enumerate(items)])
        return True

    def job(self, job_id: str) -> JobRow | None:
        row = self._run("SELECT id, owner, label, state, created, finished, expires, total, models, message "
                        "FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        counts: dict[str, int] = {}
        cached = 0
        for state, n, c in self._run("SELECT state, COUNT(*), SUM(cached) FROM items WHERE job = ? GROUP BY state",
                                     (job_id,)).fetchall():
            counts[state] = int(n)
            cached += int(c or 0)
        return JobRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                      tuple(m for m in row[8].split(",") if m), row[9], counts, cached)

    def jobs(self, owners: tuple[str, ...] | None, limit: int) -> list[JobRow]:
        """The newest jobs (of `owners`: None for every job)."""
        if owners is None:
            ids = self._run("SELECT id FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        else:
            marks = ",".join("?" * len(owners))
            ids = self._run(f"SELECT id FROM jobs WHERE owner IN ({marks}) ORDER BY created DESC LIMIT ?",  # noqa: S608 - only placeholders
                            (*owners, limit))
        rows = [self.job(i) for (i,) in ids.fetchall()]
        return [r for r in rows if r is not None]

    def unfinished(self) -> list[str]:
        """Jobs still to run, oldest first."""
        return [i for (i,) in self._run("SELECT id FROM jobs WHERE state IN ('queued', 'running') "
                                        "ORDER BY created").fetchall()]

    def unfinished_count(self) -> int:
        return int(self._run("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0])

    def pending(self, job_id: str, after: int, limit: int) -> list[tuple[int, bytes, bool]]:
        """Items this runner may run, in order, after index `after`: (index, JobItem bytes, seeded here)."""
        return [(i, bytes(r), bool(s)) for i, r, s in self._run(
            f"SELECT idx, request, seeded_here FROM items WHERE job = ? AND idx > ? AND state = 'pending'{self._free} "
            "ORDER BY idx LIMIT ?", (job_id, after, *self._free_args, limit)).fetchall()]

    _free = ""  # the SQL (and its arguments) that leaves out items another runner holds
    _free_args: tuple[object, ...] = ()

    def remaining(self, job_id: str) -> int:
        """Items not finished yet (whoever holds them)."""
        return int(self._run("SELECT COUNT(*) FROM items WHERE job = ? AND state = 'pending'", (job_id,))
                   .fetchone()[0])

    def finish_item(self, job_id: str, index: int, state: str, result: bytes, cached: bool) -> bool:
        """Write the item's result, once: False (nothing written) if it was finished already or another runner
        holds it now."""
        with self._transaction():
            return int(self._run(f"UPDATE items SET state = ?, result = ?, cached = ? WHERE job = ? AND idx = ? AND "
                                 f"state = 'pending'{self._mine}", (state, result, int(cached), job_id, index,
                                                                    *self._mine_args)).rowcount) == 1

    _mine = ""  # the SQL (and its arguments) that names an item this runner holds
    _mine_args: tuple[object, ...] = ()

    def set_state(self, job_id: str, state: str, message: str = "") -> None:
        with self._transaction():
            self._run("UPDATE jobs SET state = ?, message = ? WHERE id = ? AND state IN ('queued', 'running')",
                      (state, message, job_id))

    def finish(self, job_id: str, state: str, now: float, ttl_s: float, message: str = "") -> None:
        """The job ends (completed or cancelled): items not done are cancelled; its results expire in ttl_s."""
        with self._transaction():
            self._run("UPDATE items SET state = 'cancelled' WHERE job = ? AND state = 'pending'", (job_id,))
            self._run("UPDATE jobs SET state = ?, finished = ?, expires = ?, message = ? WHERE id = ? AND "
                      "state IN ('queued', 'running')", (state, now, now + ttl_s, message, job_id))

    def result_bytes(self, owner: str | None = None) -> int:
        """The bytes of results kept: of every job, or of one owner's."""
        args: tuple[str, ...] = ()
        if owner is None:
            query = "SELECT COALESCE(SUM(LENGTH(result)), 0) FROM items"
        else:
            query, args = ("SELECT COALESCE(SUM(LENGTH(items.result)), 0) FROM items JOIN jobs ON items.job = jobs.id "
                           "WHERE jobs.owner = ?", (owner,))
        return int(self._run(query, args).fetchone()[0])

    def items(self, job_id: str, offset: int, limit: int, max_bytes: int = 0) -> list[ItemRow]:
        """Up to `limit` items from `offset`; with `max_bytes`, no more once their results pass that many bytes
        (the sizes are read first: a page of large results never reads the blobs past its cap)."""
        with self._transaction(snapshot=True):  # the sizes and the blobs of one state (an expiry may come between)
            return self._items(job_id, offset, limit, max_bytes)

    def _items(self, job_id: str, offset: int, limit: int, max_bytes: int) -> list[ItemRow]:
        rows = self._run("SELECT idx, custom_id, state, cached, COALESCE(LENGTH(result), -1) FROM items "
                         "WHERE job = ? AND idx >= ? ORDER BY idx LIMIT ?", (job_id, offset, limit)).fetchall()
        size = 0
        for n, row in enumerate(rows):
            size += max(row[4], 0)
            if max_bytes and size > max_bytes:
                rows = rows[:n + 1]
                break
        with_result = [r[0] for r in rows if r[4] >= 0]
        results: dict[int, bytes] = {}
        for first in range(0, len(with_result), 500):  # few placeholders a statement
            chunk = with_result[first:first + 500]
            marks = ",".join("?" * len(chunk))
            results.update((i, bytes(r)) for i, r in self._run(
                f"SELECT idx, result FROM items WHERE job = ? AND idx IN ({marks})",  # noqa: S608 - only placeholders
                (job_id, *chunk)).fetchall())
        return [ItemRow(i, c, s, results.get(i), bool(k)) for i, c, s, k, _ in rows]

    def expire(self, now: float) -> int:
        """Delete the results of jobs whose time is up (their row stays, saying when they expired, for
        TOMBSTONE_DAYS); returns how many jobs expired now."""
        with self._transaction():
            gone = [i for (i,) in self._run("SELECT id FROM jobs WHERE state NOT IN ('queued', 'running', 'expired') "
                                            "AND expires <= ?", (now,)).fetchall()]
            for job_id in gone:
                self._run("DELETE FROM items WHERE job = ?", (job_id,))
                self._run("UPDATE jobs SET state = 'expired' WHERE id = ?", (job_id,))
            self._run("DELETE FROM jobs WHERE state = 'expired' AND expires <= ?", (now - TOMBSTONE_DAYS * 86400,))
        return len(gone)


class SqliteJobs(JobStore):
    """The embedded default: one file, one coordinator (it holds `jobs.lock` while it runs; a coordinator killed
    lets go of it with its process)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "jobs.sqlite3"
        self.where = str(self.path)
        self._lock = os.open(directory / "jobs.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock)
            raise JobsLocked(f"another coordinator runs the jobs of {self.path} (it holds {directory / 'jobs.lock'})"
                             ": give this one a jobs_dir of its own") from exc
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()
        os.close(self._lock)  # releases the lock

    def _run(self, sql: str, args: Sequence[object] = ()) -> Any:
        return self.db.execute(sql, args)

    def _run_many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        self.db.executemany(sql, rows)

    @contextlib.contextmanager
    def _transaction(self, write_lock: bool = False, snapshot: bool = False) -> Iterator[None]:
        # a new job commits with synchronous=FULL (an acknowledged SubmitJob survives a power loss); the
        # pragma is set outside the transaction, which it applies to
        if write_lock:
            self.db.execute("PRAGMA synchronous=FULL")
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE" if write_lock else "BEGIN")
                yield
        finally:
            if write_lock:
                self.db.execute("PRAGMA synchronous=NORMAL")
