"""Jobs on disk: one SQLite file in the store directory (`jobs.sqlite3`), written by one coordinator at a
time (it holds `jobs.lock` while it runs; a coordinator killed lets go of it with its process).

Schema: `jobs` (one row per job: owner, label, state, times, item count) and `items` (one row per item: its
request as the JobItem protobuf, pinned to a model version and a seed when it was submitted; its state; its
result as a JobItemResult protobuf). An item's result is committed before the item counts as done, so after a
crash only the items that had not finished run again. WAL journal with synchronous=NORMAL: a committed
transaction survives the process being killed; a job's submission commits with synchronous=FULL, so that an
acknowledged SubmitJob survives a power loss too (an item's result, cheap to compute again, does not wait for
the disk).

Every method is synchronous and meant to run on one thread (JobRunner's), never on the event loop.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

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
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "jobs.sqlite3"
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

    def create(self, job_id: str, owner: str, label: str, items: list[NewItem], models: list[str],
               now: float, max_unfinished: int) -> bool:
        """Store a new job, unless `max_unfinished` jobs are unfinished already (then False); on disk (fsynced)
        when it returns True."""
        self.db.execute("PRAGMA synchronous=FULL")  # outside the transaction: it applies to its commit
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                if self.unfinished_count() >= max_unfinished:
                    return False
                self.db.execute("INSERT INTO jobs (id, owner, label, state, created, total, models) VALUES "
                                "(?, ?, ?, 'queued', ?, ?, ?)",
                                (job_id, owner, label, now, len(items), ",".join(models)))
                rows = [(job_id, i, it.custom_id, it.request, int(it.seeded_here)) for i, it in enumerate(items)]
                self.db.executemany("INSERT INTO items (job, idx, custom_id, request, seeded_here, state) VALUES "
                                    "(?, ?, ?, ?, ?, 'pending')", rows)
            return True
        finally:
            self.db.execute("PRAGMA synchronous=NORMAL")

    def job(self, job_id: str) -> JobRow | None:
        row = self.db.execute("SELECT id, owner, label, state, created, finished, expires, total, models, message "
                              "FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        counts: dict[str, int] = {}
        cached = 0
        for state, n, c in self.db.execute("SELECT state, COUNT(*), SUM(cached) FROM items WHERE job = ? "
                                           "GROUP BY state", (job_id,)):
            counts[state] = n
            cached += c or 0
        return JobRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                      tuple(m for m in row[8].split(",") if m), row[9], counts, cached)

    def jobs(self, owners: tuple[str, ...] | None, limit: int) -> list[JobRow]:
        """The newest jobs (of `owners`: None for every job)."""
        if owners is None:
            ids = self.db.execute("SELECT id FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        else:
            marks = ",".join("?" * len(owners))
            ids = self.db.execute(f"SELECT id FROM jobs WHERE owner IN ({marks}) ORDER BY created DESC LIMIT ?",  # noqa: S608 - only placeholders
                                  (*owners, limit))
        rows = [self.job(i) for (i,) in ids.fetchall()]
        return [r for r in rows if r is not None]

    def unfinished(self) -> list[str]:
        """Jobs still to run, oldest first."""
        return [i for (i,) in self.db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running') "
                                              "ORDER BY created")]

    def unfinished_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0])

    def pending(self, job_id: str, after: int, limit: int) -> list[tuple[int, bytes, bool]]:
        """Items still to run, in order, after index `after`: (index, JobItem bytes, seeded here)."""
        return [(i, r, bool(s)) for i, r, s in self.db.execute(
            "SELECT idx, request, seeded_here FROM items WHERE job = ? AND idx > ? AND state = 'pending' "
            "ORDER BY idx LIMIT ?", (job_id, after, limit))]

    def finish_item(self, job_id: str, index: int, state: str, result: bytes, cached: bool) -> None:
        with self.db:
            self.db.execute("UPDATE items SET state = ?, result = ?, cached = ? WHERE job = ? AND idx = ? AND "
                            "state = 'pending'", (state, result, int(cached), job_id, index))

    def set_state(self, job_id: str, state: str, message: str = "") -> None:
        with self.db:
            self.db.execute("UPDATE jobs SET state = ?, message = ? WHERE id = ? AND state IN ('queued', 'running')",
                            (state, message, job_id))

    def finish(self, job_id: str, state: str, now: float, ttl_s: float, message: str = "") -> None:
        """The job ends (completed or cancelled): items not done are cancelled; its results expire in ttl_s."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE items SET state = 'cancelled' WHERE job = ? AND state = 'pending'", (job_id,))
            self.db.execute("UPDATE jobs SET state = ?, finished = ?, expires = ?, message = ? WHERE id = ? AND "
                            "state IN ('queued', 'running')", (state, now, now + ttl_s, message, job_id))

    def result_bytes(self, owner: str | None = None) -> int:
        """The bytes of results kept: of every job, or of one owner's."""
        args: tuple[str, ...] = ()
        if owner is None:
            query = "SELECT COALESCE(SUM(LENGTH(result)), 0) FROM items"
        else:
            query, args = ("SELECT COALESCE(SUM(LENGTH(items.result)), 0) FROM items JOIN jobs ON items.job = jobs.id "
                           "WHERE jobs.owner = ?", (owner,))
        return int(self.db.execute(query, args).fetchone()[0])

    def items(self, job_id: str, offset: int, limit: int, max_bytes: int = 0) -> list[ItemRow]:
        """Up to `limit` items from `offset`; with `max_bytes`, no more once their results pass that many bytes
        (the rows are read one by one: a page of large results never reads the blobs past its cap)."""
        out: list[ItemRow] = []
        size = 0
        for i, c, s, r, k in self.db.execute(
                "SELECT idx, custom_id, state, result, cached FROM items WHERE job = ? AND idx >= ? ORDER BY idx "
                "LIMIT ?", (job_id, offset, limit)):
            out.append(ItemRow(i, c, s, r, bool(k)))
            size += len(r) if r is not None else 0
            if max_bytes and size > max_bytes:
                break
        return out

    def expire(self, now: float) -> int:
        """Delete the results of jobs whose time is up (their row stays, saying when they expired, for
        TOMBSTONE_DAYS); returns how many jobs expired now."""
        with self.db:
            self.db.execute("BEGIN")
            gone = [i for (i,) in self.db.execute("SELECT id FROM jobs WHERE state NOT IN ('queued', 'running', "
                                                  "'expired') AND expires <= ?", (now,))]
            for job_id in gone:
                self.db.execute("DELETE FROM items WHERE job = ?", (job_id,))
                self.db.execute("UPDATE jobs SET state = 'expired' WHERE id = ?", (job_id,))
            self.db.execute("DELETE FROM jobs WHERE state = 'expired' AND expires <= ?",
                            (now - TOMBSTONE_DAYS * 86400,))
        return len(gone)
