"""A model that a coordinator serves is never replaced under it (issue 27.5).

While a coordinator serves a model of its store (any version of any deployment whose source it is), it holds
a shared lock on `<store>/.locks/<model>.lock`. `coordinator import --overwrite` of that model takes the lock
exclusively, without waiting, for the time it replaces the files: while a coordinator serves the model, the
import is refused, naming the way to roll out new weights (import them under another name and load that as
a new version). A deployment also pins its weights' digest when it loads (a worker refuses other weights),
so a store shared over a network file system without working locks still never serves mixed weights.

The locks are POSIX advisory locks (`flock`): they fall with the process that holds them, a crash included.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)
LOCKS = ".locks"


class ModelInUse(ValueError):
    """The model to replace is served by a running coordinator."""


def lock_path(root: Path, name: str) -> Path:
    return root / LOCKS / f"{name}.lock"


def _open(root: Path, name: str) -> IO[str]:
    path = lock_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")  # noqa: SIM115 - held as long as the lock is


@contextlib.contextmanager
def replacing(root: Path, name: str) -> Iterator[None]:
    """Hold `name` exclusively while its files are replaced; ModelInUse if a coordinator serves it."""
    handle = _open(root, name)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelInUse(
                f"model {name!r} is served by a running coordinator (it holds {lock_path(root, name)}): its "
                f"weights never change under it. Import the new weights under another --name and load them as a "
                f"new version (coordinator models load {name} --version 2 --source NEW-NAME --promote), or unload "
                f"{name!r} first") from None
        yield
    finally:
        handle.close()


class Served:
    """The shared locks one coordinator holds: one per model it serves, however many versions use it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._held: dict[str, IO[str]] = {}
        self._warned = False

    def hold(self, names: set[str]) -> None:
        """Hold exactly these models (new ones locked, the rest let go). A model being replaced right now is
        waited for (a rename: moments); a store the coordinator cannot write to is served unlocked (said
        once: the weights' digest still guards every load)."""
        for name in set(self._held) - names:
            self._held.pop(name).close()
        for name in names - set(self._held):
            handle = None
            try:
                handle = _open(self.root, name)
                fcntl.flock(handle, fcntl.LOCK_SH)
            except OSError as exc:
                if handle is not None:
                    handle.close()
                if not self._warned:
                    log.warning("cannot lock the models served in %s (%s): `import --overwrite` is not refused "
                                "while they are served (a load of changed weights still is)", self.root, exc)
                    self._warned = True
                continue
            self._held[name] = handle

    @property
    def names(self) -> set[str]:
        return set(self._held)

    def close(self) -> None:
        self.hold(set())
