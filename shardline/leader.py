"""Finding the leading coordinator among several (standby coordinators on etcd, issue 29), for the SDK and
workers alike. A standby answers every call UNAVAILABLE with trailing metadata naming the leader (its public
address, the address workers register on, its epoch) and saying it is a standby.

Right after a leader dies its lease has not lapsed yet, and standbys still name it: `DeadLeaders` keeps that
stale news from sending a caller back to it. A leader found unreachable is not gone back to while standbys name
it with the epoch they named first after the loss; another epoch at the same address is a new leadership, and
is followed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

LEADER_HEADER = "shardline-leader"
LEADER_CLUSTER_HEADER = "shardline-leader-cluster"
LEADER_EPOCH_HEADER = "shardline-leader-epoch"
STANDBY_HEADER = "shardline-standby"  # on every standby answer, whether or not it knows a leader
# how long after a loss the first epoch standbys name for the lost leader is taken as stale news: longer than a
# lease (default 3 s) takes to lapse; an epoch first heard later is a new leadership, followed
DEAD_WINDOW_S = 15.0
TAKEOVER_S = 5.0  # a standby that stops answering this soon after it answered is taking over: waited for


@dataclass(frozen=True)
class Redirect:
    """What an error's trailing metadata says of the leader (all empty: not a standby's answer)."""

    standby: bool = False
    address: str = ""
    cluster_address: str = ""
    epoch: str = ""

    @classmethod
    def of(cls, err: Any) -> Redirect:
        try:
            trailers: Iterable[Any] = err.trailing_metadata() or ()
        except Exception:  # noqa: BLE001 - an error object without a call behind it
            return cls()
        pairs = {str(k): str(v) for k, v in trailers}
        return cls(STANDBY_HEADER in pairs, pairs.get(LEADER_HEADER, ""), pairs.get(LEADER_CLUSTER_HEADER, ""),
                   pairs.get(LEADER_EPOCH_HEADER, ""))


@dataclass
class DeadLeaders:
    clock: Callable[[], float] = time.monotonic
    lost_at: dict[str, float] = field(default_factory=dict)
    stale: dict[str, str] = field(default_factory=dict)  # address -> the epoch standbys named first after its loss
    standby_at: dict[str, float] = field(default_factory=dict)  # address -> when it last answered as a standby

    def standing_by(self, address: str) -> None:
        """`address` answered as a standby."""
        self.standby_at[address] = self.clock()

    def lost(self, address: str) -> bool:
        """`address` could not be reached: True if it is lost (go elsewhere); False if it was a standby a moment
        ago: most likely it is taking over (its standby ports close as its leader's open), so stay."""
        if self.clock() - self.standby_at.get(address, float("-inf")) < TAKEOVER_S:
            return False
        self.lost_at[address] = self.clock()
        self.stale.pop(address, None)
        return True

    def fresh(self, address: str, epoch: str) -> bool:
        """Whether a standby naming `address` in `epoch` is worth following."""
        lost = self.lost_at.get(address)
        if lost is None or self.clock() - lost > DEAD_WINDOW_S:
            return True
        return epoch != self.stale.setdefault(address, epoch)


__all__ = ["DEAD_WINDOW_S", "LEADER_CLUSTER_HEADER", "LEADER_EPOCH_HEADER", "LEADER_HEADER", "STANDBY_HEADER",
           "TAKEOVER_S", "DeadLeaders", "Redirect"]
