"""The fleet's run-time changes, committed before they are acknowledged, so that a coordinator that restarts
serves what it served (issue 27.2): every load, unload, scale and promote is written here first, and at start
the fleet replays them on top of the deployments its configuration lists.

The changes belong to one configuration: the file is named by a digest of the configured deployments, so a
coordinator started with the same configuration resumes them, and one started with another (an operator's new
intent) starts from that configuration alone (the old file stays, unread, and the start says so).

`SqliteFleetState` is the embedded default (SQLite beside the model store, `synchronous=FULL`: a change
acknowledged is on disk); `FleetState` is the interface a shared engine (etcd, issue 29) implements too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from coordinator.config import DeploymentSpec

log = logging.getLogger(__name__)
VERSION = 1  # of the records' layout (PRAGMA user_version); a newer file is refused, never read half


class FleetStateError(ValueError):
    """The fleet state is there but cannot be read as it is (damaged, or of a newer release): the coordinator
    does not start, rather than serve half of what it served; the message names the file and what to do."""


def _unreadable(path: Path, what: str) -> FleetStateError:
    return FleetStateError(f"the fleet state {path} {what}: move it away to start from the configuration alone "
                           "(the run-time changes it holds are then forgotten), or restore it from a backup")

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (key TEXT PRIMARY KEY, spec TEXT);  -- spec NULL: unloaded
CREATE TABLE IF NOT EXISTS defaults (name TEXT PRIMARY KEY, version TEXT NOT NULL);
"""


@dataclass
class Changes:
    """What run time changed: deployments loaded or scaled (their spec) or unloaded (None), and defaults."""

    deployments: dict[str, DeploymentSpec | None] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)

    def applied(self, configured: list[DeploymentSpec]) -> list[DeploymentSpec]:
        """The configured deployments with the changes made since: in the configuration's order, then the
        loaded ones in the order they were loaded."""
        specs = {s.key: s for s in configured}
        for key, spec in self.deployments.items():
            if spec is None:
                specs.pop(key, None)
            else:
                specs[key] = spec
        return list(specs.values())


class FleetState(Protocol):
    def changes(self) -> Changes: ...
    def deployed(self, spec: DeploymentSpec) -> None: ...
    def unloaded(self, key: str) -> None: ...
    def promoted(self, name: str, version: str) -> None: ...
    def close(self) -> None: ...


def configuration_digest(configured: list[DeploymentSpec]) -> str:
    """Of the deployments as configured (values left at their defaults out: a release that adds a field with
    a default keeps the digest)."""
    text = json.dumps([s.model_dump(mode="json", exclude_defaults=True) for s in configured], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SqliteFleetState:
    """One SQLite file; every write commits before it returns (callers write on the event loop: a change is
    rare, and its order is the order they were made)."""

    def __init__(self, path: Path) -> None:
        """OSError if another coordinator holds this state (one coordinator per state file); sqlite3.Error if
        the file is not a database."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._held = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 - held for the coordinator's life
        try:
            fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._held.close()
            raise OSError(f"another coordinator holds {path}") from None
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=1.0)
        self._lock = threading.Lock()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged change survives a power loss
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > VERSION:
                raise FleetStateError(f"the fleet state {path} was written by a newer shardline (layout {version}; "
                                      f"this one reads {VERSION}): run that release, or move the file away to start "
                                      "from the configuration alone")
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version = {VERSION}")
        except sqlite3.OperationalError as exc:  # the file may be fine: the disk, its rights, a program holding it
            self.close()
            raise FleetStateError(f"the fleet state {path} cannot be opened ({exc}): check the disk, the file's "
                                  "rights, and that no other program holds it; then start again") from None
        except sqlite3.DatabaseError as exc:
            self.close()
            raise _unreadable(path, f"is not a fleet state ({exc})") from None
        except FleetStateError:
            self.close()
            raise

    @classmethod
    def beside(cls, directory: Path, configured: list[DeploymentSpec]) -> SqliteFleetState:
        """The state of this configuration, in `directory`; says when another configuration's state is there."""
        name = f"fleet-{configuration_digest(configured)}.sqlite"
        others = sorted(p.name for p in directory.glob("fleet-*.sqlite") if p.name != name) \
            if directory.is_dir() else []
        if others:
            log.info("the run-time changes of other configurations stay unread in %s (%s)", directory,
                     ", ".join(others))
        return cls(directory / name)

    def changes(self) -> Changes:
        try:
            with self._lock:
                rows = self._db.execute("SELECT key, spec FROM deployments ORDER BY rowid").fetchall()
                defaults = dict(self._db.execute("SELECT name, version FROM defaults").fetchall())
        except sqlite3.DatabaseError as exc:
            raise _unreadable(self.path, f"cannot be read ({exc})") from None
        changes = Changes(defaults=defaults)
        for key, spec in rows:
            try:
                changes.deployments[key] = DeploymentSpec.model_validate_json(spec) if spec is not None else None
            except ValidationError as exc:
                raise _unreadable(self.path, f"holds a record that does not parse (deployment {key!r}: "
                                             f"{exc.errors()[0]['msg']})") from None
        return changes

    def _write(self, sql: str, values: tuple[str | None, ...]) -> None:
        with self._lock:
            self._db.execute(sql, values)

    def deployed(self, spec: DeploymentSpec) -> None:
        """A deployment loaded, or scaled (`spec.replicas`), at run time."""
        self._write("INSERT INTO deployments (key, spec) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET spec = excluded.spec", (spec.key, spec.model_dump_json()))

    def unloaded(self, key: str) -> None:
        self._write("INSERT INTO deployments (key, spec) VALUES (?, NULL) "
                    "ON CONFLICT (key) DO UPDATE SET spec = NULL", (key,))

    def promoted(self, name: str, version: str) -> None:
        self._write("INSERT INTO defaults (name, version) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET version = excluded.version", (name, version))

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._held.close()  # and the lock with it


def opened(directory: Path, configured: list[DeploymentSpec]) -> FleetState:
    """The durable state of this configuration, or, when it cannot be had (another coordinator holds it, the
    directory is read-only), none: logged as an ERROR naming the file, and the coordinator serves its
    configuration, forgetting run-time changes, rather than not at all. A state that is there but damaged or
    of a newer release is FleetStateError: the coordinator does not start (it would serve half)."""
    try:
        return SqliteFleetState.beside(directory, configured)
    except OSError as exc:
        log.error("run-time changes will not survive a restart: the fleet state in %s cannot be used (%s)",
                  directory, exc)
        return Forgetful()


class Forgetful:
    """No durable state (a coordinator configured without one): changes last as long as the process."""

    def changes(self) -> Changes:
        return Changes()

    def deployed(self, spec: DeploymentSpec) -> None:
        pass

    def unloaded(self, key: str) -> None:
        pass

    def promoted(self, name: str, version: str) -> None:
        pass

    def close(self) -> None:
        pass
