"""How every state machine of the coordinator checks a move: against its table of allowed moves (worker,
replica: coordinator/fleet/states.py; stream: coordinator/serving/streams.py).

A move the table does not allow is a bug of the coordinator's: it is logged as an ERROR naming both states (the
test suite fails on such a line, tests/conftest.py) and the state is set anyway, so that a missed case in a
table never stops a cluster that would otherwise serve.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

log = logging.getLogger(__name__)

ILLEGAL = "illegal state transition"  # the log line's words, which the test suite watches for


S = TypeVar("S", bound=StrEnum)


def allowed(table: Mapping[S, frozenset[S]], old: S, new: S) -> bool:
    """Staying in a state is always allowed (a new message, the same state)."""
    return old == new or new in table[old]


def moved(what: str, table: Mapping[S, frozenset[S]], old: S, new: S) -> None:
    """Check one move; an illegal one is logged (see the module's docstring), never raised."""
    if not allowed(table, old, new):
        log.error("%s: %s %s -> %s (not in its table)", ILLEGAL, what, old, new)
