"""Jobs in PostgreSQL (`--jobs-db postgresql://...`): one database the coordinators of a cluster share, so that a
standby that takes over goes on with the jobs of the leader it replaces.

Items are claimed under a lease. A runner claims an item just before it runs it (`claim`: its id in
`claimed_by`, `claimed_until` CLAIM_S ahead on the database's clock) and renews its claims every few seconds
while they run; a result is written only by the runner that holds the item (`finish_item` checks
`claimed_by`), so two coordinators never both finish one item, and a deposed leader that wakes up (paused,
cut off) writes nothing over its successor's work. A runner that stops releases its claims; one that dies
leaves them to lapse, and the next leader takes those items then and runs them from the start (with the
same seed: the result is the one an uninterrupted run gives).

The connection is psycopg 3's, synchronous, on the job runner's thread. Every wait has a bound: a connection
attempt 5 s, a statement 10 s (on the server), a silent peer about 11 s (TCP keepalives) and unacknowledged
data 10 s (tcp_user_timeout). A database that cannot be reached raises JobsUnavailable (gRPC UNAVAILABLE,
naming the database); the next call connects again.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from coordinator.config import database_name
from coordinator.jobs.store import JobStore
from shardline.errors import Unavailable

CLAIM_S = 8.0  # an item's claim lasts this long unless renewed (every 2 s: runner.RENEW_EVERY_S); a dead
# leader's items wait this long
ADVISORY_LOCK = 0x5348_4A4F  # serializes job submissions (the unfinished-jobs limit) and the schema's creation
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, label TEXT NOT NULL, state TEXT NOT NULL,
  created DOUBLE PRECISION NOT NULL, finished DOUBLE PRECISION NOT NULL DEFAULT 0,
  expires DOUBLE PRECISION NOT NULL DEFAULT 0, total INTEGER NOT NULL, models TEXT NOT NULL,
  message TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS items (
  job TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL, request BYTEA NOT NULL,
  seeded_here INTEGER NOT NULL, state TEXT NOT NULL, result BYTEA, cached INTEGER NOT NULL DEFAULT 0,
  claimed_by TEXT NOT NULL DEFAULT '', claimed_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
  PRIMARY KEY (job, idx));
CREATE INDEX IF NOT EXISTS items_claimed ON items (claimed_by) WHERE state = 'pending';
"""
# the server ends a statement after 10 s, a wait for a lock after 5 s, and a transaction left open (its client
# cut off between statements) after 15 s, so that a lost coordinator holds no row or lock for long
LIMITS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
          "keepalives_count": 3, "tcp_user_timeout": 10000,
          "options": "-c statement_timeout=10000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=15000"}
DOWN_S = 1.0  # after a failed connection, calls fail at once for this long (a status call waits on no connect)


class JobsUnavailable(Unavailable):
    """The jobs database cannot be reached now."""


class PostgresJobs(JobStore):
    claims = True

    def __init__(self, url: str) -> None:
        self.url, self.where = url, database_name(url)
        self.runner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this runner's claims
        self._free = " AND (claimed_by = ? OR claimed_until < clock_timestamp())"
        self._free_args = self._mine_args = (self.runner,)
        self._mine = " AND claimed_by = ?"
        self._db: psycopg.Connection[Any] | None = None
        self._down: tuple[float, JobsUnavailable] | None = None  # when the last connection attempt failed
        with self._transaction(write_lock=True):  # two coordinators starting at once create it once
            self._run(SCHEMA)

    def _unavailable(self, exc: Exception) -> JobsUnavailable:
        """The error said as a person reads it. The server's own (a statement timed out, a lock not granted, a
        deadlock: it has an SQLSTATE) keeps the connection; any other drops it (the next call connects again)."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # libpq's first line says it all, after its "connection to server at ... failed:" (the rest: hints)
        reason = " ".join(lines[0].rsplit(" failed: ", 1)[-1].split()) if lines else type(exc).__name__
        if getattr(exc, "sqlstate", None) and self._db is not None and not self._db.broken:
            return JobsUnavailable(f"the jobs database {self.where} is busy: {reason} (tried again later)")
        if self._db is not None:
            with contextlib.suppress(psycopg.Error):
                self._db.close()
            self._db = None
        return JobsUnavailable(f"the jobs database {self.where} cannot be reached: {reason}")

    def _connection(self) -> psycopg.Connection[Any]:
        if self._db is None or self._db.closed or self._db.broken:
            if self._down is not None and time.monotonic() - self._down[0] < DOWN_S:
                raise self._down[1]
            try:
                self._db = psycopg.connect(self.url, autocommit=True, **LIMITS)  # type: ignore[arg-type]
                self._down = None
            except psycopg.OperationalError as exc:
                self._down = (time.monotonic(), self._unavailable(exc))
                raise self._down[1] from exc
        return self._db

    def _run(self, sql: str, args: Sequence[object] = ()) -> Any:
        try:
            return self._connection().execute(sql.replace("?", "%s") if args else sql, args or None)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from exc

    def _run_many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        try:
            self._connection().cursor().executemany(sql.replace("?", "%s"), rows)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from exc

    @contextlib.contextmanager
    def _transaction(self, write_lock: bool = False, snapshot: bool = False) -> Iterator[None]:
        try:
            with self._connection().transaction():
                if snapshot:  # its reads see one state of the database
                    self._run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                if write_lock:
                    self._run("SELECT pg_advisory_xact_lock(?)", (ADVISORY_LOCK,))
                yield
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def claim(self, job_id: str, index: int) -> bool:
        return int(self._run("UPDATE items SET claimed_by = ?, claimed_until = clock_timestamp() + "
                             "make_interval(secs => ?) WHERE job = ? AND idx = ? AND state = 'pending' AND "
                             "(claimed_by = ? OR claimed_until < clock_timestamp())",
                             (self.runner, CLAIM_S, job_id, index, self.runner)).rowcount) == 1

    def renew(self) -> None:
        self._run("UPDATE items SET claimed_until = clock_timestamp() + make_interval(secs => ?) "
                  "WHERE claimed_by = ? AND state = 'pending'", (CLAIM_S, self.runner))

    def release(self) -> None:
        self._run("UPDATE items SET claimed_until = '-infinity' WHERE claimed_by = ? AND state = 'pending'",
                  (self.runner,))


__all__ = ["CLAIM_S", "JobsUnavailable", "PostgresJobs"]
