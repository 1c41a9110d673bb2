"""The chain the scheduler steps through, behind a gate.

The cluster installs a chain (a new epoch) and opens the gate; while it heals or migrates, the gate is
closed and steps wait at it instead of failing. A step that fails for a reason of the cluster's (a stage
unreachable, a link stalled past its deadline, a cache that is gone) is reported with the epoch it ran in:
the cluster heals once per epoch, however many steps saw the failure, and every caller resumes on the new
chain by replaying from the coordinator's token ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from coordinator.serving.chain import ChainClient
from coordinator.serving.streams import TOKEN_WAIT_S
from shardline.errors import DeadlineExceeded, FailedPrecondition, NotFound, ShardlineError, Unavailable
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2

# failures that say the chain is broken, not the request: healed, then replayed. A request cannot cause
# FAILED_PRECONDITION or NOT_FOUND on a stage (the coordinator validated it): a stage without its shard, or
# without a session's cache, is a worker that restarted.
RECOVERABLE: tuple[type[ShardlineError], ...] = (Unavailable, DeadlineExceeded, NotFound, FailedPrecondition)
MAX_STATELESS_RETRIES = 3


class Pipeline:
    def __init__(self, heal: Callable[[int, BaseException], Awaitable[None]],
                 links: LinkSettings | None = None) -> None:
        self._heal = heal
        self.links = links or LinkSettings()  # every chain's settings (and the cluster's identity)
        self.chain: ChainClient | None = None
        self.epoch = 0
        self.failure: ShardlineError | None = None  # why there is no chain, when the cluster cannot serve
        self._last_addresses: list[str] = []
        self._open = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    @property
    def addresses(self) -> list[str]:
        """The stages of the chain, or of the last one while there is none (their caches may still hold
        sessions to free)."""
        return list(self.chain.addresses) if self.chain is not None else list(self._last_addresses)

    def install(self, chain: ChainClient) -> ChainClient | None:
        """A new chain and epoch (the gate stays as it is); returns the old chain for the caller to close."""
        old, self.chain = self.chain, chain
        self._last_addresses = list(chain.addresses)
        self.failure = None
        self.epoch += 1
        return old

    def retire(self) -> ChainClient | None:
        """No chain for now (a new epoch, the gate closed): steps in flight belong to a retired epoch. Returns
        the old chain for the caller to close."""
        old, self.chain = self.chain, None
        self.epoch += 1
        self._open.clear()
        return old

    def fail(self, error: ShardlineError) -> ChainClient | None:
        """No chain, and none coming: everyone at the gate, or arriving at it, gets `error` until a chain is
        installed again. Returns the old chain for the caller to close."""
        old = self.retire()
        self.failure = error
        self._open.set()
        return old

    def suspend(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def wait_open(self) -> ChainClient:
        """The chain to step through, once the gate opens; raises the failure if the cluster cannot serve."""
        while True:
            await self._open.wait()
            if self.chain is not None:
                return self.chain
            if self.failure is not None:
                raise self.failure
            self._open.clear()

    async def heal(self, epoch: int, error: BaseException) -> None:
        """Report a failure seen in `epoch`; returns once the cluster has healed (or given up, in which case
        it has failed the streams concerned)."""
        await self._heal(epoch, error)

    async def stateless_step(self, sequences: list[worker_pb2.SequenceSlice], token_ids: list[int],
                             output: worker_pb2.OutputKind, wait_s: float = TOKEN_WAIT_S) -> worker_pb2.ForwardResponse:
        """A step with no session state to rebuild (an encoder's forward): after a heal it simply runs again.
        A gate closed for `wait_s` (a heal that does not end) fails it with UNAVAILABLE."""
        for attempt in range(MAX_STATELESS_RETRIES + 1):
            try:
                chain = await asyncio.wait_for(self.wait_open(), wait_s)
            except TimeoutError:
                raise Unavailable(f"the chain stayed closed (healing) for {wait_s:g} s (token_wait_s): try again "
                                  "later") from None
            epoch = self.epoch
            try:
                return await chain.step(sequences, token_ids, output)
            except RECOVERABLE as exc:
                if attempt == MAX_STATELESS_RETRIES:
                    raise
                await self.heal(epoch, exc)
        raise AssertionError("unreachable")  # pragma: no cover
