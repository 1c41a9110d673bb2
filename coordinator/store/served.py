"""A model that a coordinator serves is never replaced under it (issue 27.5).

While a coordinator serves a model of its store (any version of any deployment whose source it is), it holds
a shared lock on `<store>/.locks/<model>.lock`, taken before it reads the model's manifest. `coordinator import
--overwrite` of that model takes the lock exclusively, without waiting, for the time it replaces the files:
while a coordinator serves the model, the import is refused, naming the way to roll out new weights (import
them under another name and load that as a new version). A deployment also pins its weights' digest when it
loads (a worker refuses other weights), so a store whose file system has no working locks still never serves
mixed weights.

The locks are `flock` locks (advisory, whole-file): they fall with the process that holds them, a crash
included. The coordinator never blocks its event loop on one: it tries without waiting, and while an import
is replacing the model it retries for a moment (REPLACING_WAIT_S), then says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from shardline.errors import Unavailable

log = logging.getLogger(__name__)
LOCKS = ".locks"
REPLACING_WAIT_S = 30.0  # an import's rename is moments; a removal of a large old copy takes longer


class ModelInUse(ValueError):
    """The model to replace is served by a running coordinator."""


def lock_path(root: Path, name: str) -> Path:
    return root / LOCKS / f"{name}.lock"


def _open(root: Path, name: str) -> int:
    """The lock file's descriptor (read-only: flock needs no write access; created if missing)."""
    path = lock_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)


@contextlib.contextmanager
def replacing(root: Path, name: str) -> Iterator[None]:
    """Hold `name` exclusively while its files are replaced; ModelInUse if a coordinator serves it (OSError if
    the lock file cannot be made)."""
    fd = _open(root, name)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelInUse(
                f"model {name!r} is served by a running coordinator (it holds {lock_path(root, name)}): its "
                f"weights never change under it. Import the new weights under another --name and load them as a "
                f"new version (coordinator models load {name} --version 2 --source NEW-NAME --promote), or unload "
                f"{name!r} first") from None
        yield
    finally:
        os.close(fd)


class Served:
    """The shared locks one coordinator holds: one per model it serves, however many versions use it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._held: dict[str, int] = {}
        self._warned = False

    def _try(self, name: str) -> bool | None:
        """Lock `name` shared without waiting: True when held, False while an import replaces it, None when
        it cannot be locked at all (said once: the weights' digest still guards every load)."""
        if name in self._held:
            return True
        try:
            fd = _open(self.root, name)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot lock the models served in %s (%s): `import --overwrite` is not refused while "
                            "they are served (a load of changed weights still is)", self.root, exc)
                self._warned = True
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            log.warning("cannot lock model %s in %s (%s): served unlocked", name, self.root, exc)
            return None
        self._held[name] = fd
        return True

    async def take(self, name: str, wait_s: float = REPLACING_WAIT_S) -> None:
        """Hold `name` before its files are read; Unavailable if an import is still replacing it after
        `wait_s` (the event loop is never blocked: it retries every 0.1 s)."""
        deadline = time.monotonic() + wait_s
        while self._try(name) is False:
            if time.monotonic() >= deadline:
                raise Unavailable(f"model {name!r} is being replaced in the store by `coordinator import "
                                  f"--overwrite` (it holds {lock_path(self.root, name)}): try again once it is done")
            await asyncio.sleep(0.1)

    def hold(self, names: set[str]) -> None:
        """Hold exactly these models: the rest are let go; one not held yet is taken without waiting (a
        model is taken before its deployment is made, so this only catches one let go in between)."""
        for name in set(self._held) - names:
            os.close(self._held.pop(name))
        for name in names - set(self._held):
            if self._try(name) is False:
                log.warning("model %s is being replaced by an import while it is served: the weights' digest "
                            "keeps its loads to the weights it was deployed with", name)

    @property
    def names(self) -> set[str]:
        return set(self._held)

    def close(self) -> None:
        self.hold(set())
