"""Finding the leader (shardline/leader.py): a standby's stale news of a dead leader is not followed, a new
leadership at the same address is, and the memory of a loss fades."""

from __future__ import annotations

from shardline.leader import DEAD_WINDOW_S, TAKEOVER_S, DeadLeaders, Redirect


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_dead_leader_named_in_its_old_epoch_is_stale_a_new_epoch_is_followed():
    clock = Clock()
    dead = DeadLeaders(clock)
    assert dead.fresh("a:1", "7")  # never lost: followed
    dead.lost("a:1")
    clock.now = 2.0
    assert not dead.fresh("a:1", "7") and not dead.fresh("a:1", "7")  # its lease not lapsed yet: stale
    assert dead.fresh("a:1", "9")  # a new leadership at the same address (it restarted and won)
    assert dead.fresh("b:1", "9")
    dead.lost("a:1")
    clock.now += DEAD_WINDOW_S + 1
    assert dead.fresh("a:1", "9")  # long ago: whatever a standby says is news again


def test_a_standby_that_stops_answering_is_taking_over_and_is_waited_for():
    clock = Clock()
    dead = DeadLeaders(clock)
    dead.standing_by("b:1")
    clock.now = 1.0
    assert dead.lost("b:1") is False and dead.fresh("b:1", "5")  # its ports changing hands: not dead
    clock.now = 1.0 + TAKEOVER_S
    assert dead.lost("b:1") is True and not dead.fresh("b:1", "5")  # gone for good: dead


def test_a_redirect_is_read_from_trailing_metadata():
    class Err:
        def trailing_metadata(self):
            return (("shardline-standby", "1"), ("shardline-leader", "h:1"), ("shardline-leader-cluster", "h:2"),
                    ("shardline-leader-epoch", "12"))

    class Plain:
        def trailing_metadata(self):
            raise RuntimeError("no call")

    assert Redirect.of(Err()) == Redirect(True, "h:1", "h:2", "12")
    assert Redirect.of(Plain()) == Redirect()
