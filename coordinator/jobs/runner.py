"""Asynchronous jobs: batches of generate or infer requests, stored (coordinator/jobs/store.py) and run in the
background, after interactive requests.

The runner is one supervised task. It takes unfinished jobs oldest first and starts their pending items while
it has free slots (`job_concurrency`); each item runs as a background stream (the scheduler admits it only
when no interactive stream waits, and preempts it first), and its result is committed before the item counts
as done. A coordinator that restarts finds its unfinished jobs in the database and goes on with the items
that have no result; an item that ran when the coordinator died runs again, from the start, with the same
seed (a sampled item without one got one at submission), so its result is the one an uninterrupted run gives.

An item fails alone, with its error, when the error is the request's (it was checked at submission, so this
is rare: its model version was unloaded since, say); a cluster that cannot serve now (not ready, recovering,
at capacity) is waited for, with back-off. Finished jobs' results expire `job_result_ttl_s` after they end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from coordinator.config import database_name
from coordinator.fleet.requests import generate, infer
from coordinator.jobs.store import JobRow, JobsLocked, JobStore, NewItem, SqliteJobs
from coordinator.serving.request_log import MAX_REQUEST_ID_CHARS
from coordinator.serving.result_cache import ResultCache
from coordinator.wire import FINISH, embed_request, generation_request
from shardline.codec import fill_tensor, from_numpy
from shardline.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    NotFound,
    ResourceExhausted,
    ShardlineError,
    Unavailable,
)
from shardline.v1 import coordinator_pb2

if TYPE_CHECKING:
    from coordinator.fleet.fleet import Fleet

log = logging.getLogger(__name__)
T = TypeVar("T")
WAITS = (Unavailable, ResourceExhausted, DeadlineExceeded)  # the cluster's state now: wait, then try again
BATCH = 256          # pending items read from the database at a time
EXPIRY_EVERY_S = 60  # how often finished jobs' results are checked for expiry
MAX_BACKOFF_S = 5.0
STORE_RETRY_S = 600.0  # a result the job store cannot take is retried this long before the item runs again
STORE_WAIT = "cannot store results"
MAX_ITEM_WAIT_S = 3600.0  # an item the cluster cannot serve for this long fails with the last reason
MAX_VERSION_WAIT_S = 300.0  # an item whose pinned version is not deployed waits this long for it
RETRY_S = 2.0  # a job with items left that this runner could not finish (held elsewhere, not stored) tries again
RENEW_EVERY_S = 2.0  # claims on shared jobs (coordinator/jobs/postgres.py) are renewed this often
STOP_DB_S = 5.0  # a stop waits this long for the store to release its claims and close


@dataclass
class Running:
    """A job this runner has started: its item tasks in flight."""

    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    started_all: bool = False
    cancelled: bool = False
    waiting: str = ""  # why items wait (the cluster's state), shown as the job's message
    owner: str = ""    # the API key name that submitted it: its items use that key's caches
    missing: dict[str, float] = field(default_factory=dict)  # a pinned version not deployed -> since when


def failed(exc: ShardlineError, why: str = "") -> coordinator_pb2.JobItemResult:
    return coordinator_pb2.JobItemResult(error_code=exc.code.value[0], error=exc.message + why)


class JobRunner:
    def __init__(self, fleet: Fleet, cache: ResultCache, directory: Path) -> None:
        config = fleet.config
        self.fleet, self.cache, self.directory = fleet, cache, directory
        self.concurrency, self.ttl_s = config.job_concurrency, config.job_result_ttl_s
        self.url = config.jobs_db  # a PostgreSQL the coordinators share, or None: SQLite in `directory`
        self.store: JobStore | None = None
        self.off = "the job runner has not started"  # why jobs are off, while they are
        self.away = ""  # why the shared jobs database cannot be reached, when it was last asked and could not be
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jobs-db")
        self._slots = asyncio.Semaphore(self.concurrency)
        self._infer_slot = asyncio.Semaphore(1)  # embedding items run one at a time (Infer has no lower priority)
        self._stopping = False
        self._wake = asyncio.Event()
        self._running: dict[str, Running] = {}
        self._later: dict[str, float] = {}  # a job not to start again before (monotonic)
        self._task: asyncio.Task[None] | None = None

    # -- life -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store and start the runner. SQLite that cannot be opened turns jobs off on this coordinator
        (said in every jobs call); a shared PostgreSQL is connected to by the runner, in the background (a
        coordinator that takes over serves at once; job calls answer UNAVAILABLE until it is reached)."""
        if self.url is None:
            try:
                self.store = await self._db(SqliteJobs, self.directory)
            except (JobsLocked, OSError) as exc:
                self.off = f"jobs are off on this coordinator: {exc}"
                log.warning("%s", self.off)
                return
            self.off = ""
            if unfinished := await self._db(self.store.unfinished):
                log.info("jobs: %d unfinished job(s) in %s go on", len(unfinished), self.store.where)
        else:
            self.off = f"the jobs database {database_name(self.url)} has not been reached yet"
        self._task = asyncio.create_task(self._supervise(), name="job runner")

    async def _open_shared(self) -> None:
        """Connect to the shared jobs database (PostgreSQL), trying again with back-off until it answers."""
        from coordinator.jobs.postgres import JobsUnavailable, PostgresJobs

        delay, said = 0.5, False
        while self.store is None:
            try:
                store = await self._db(PostgresJobs, self.url)
            except JobsUnavailable as exc:
                self.off = exc.message
                if not said:
                    log.warning("jobs: %s (trying again every few seconds)", exc.message)
                    said = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            if self._stopping:  # stopped while it connected
                await self._db(store.close)
                return
            self.store = store
        self.off = ""
        log.info("jobs: in %s, shared with this cluster's other coordinators", self.store.where)

    async def stop(self) -> None:
        """Stop every item in flight (they stay pending on disk: the next start runs them)."""
        self._stopping = True
        tasks = [t for r in self._running.values() for t in r.tasks]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.store is not None:
            store, self.store = self.store, None
            try:  # shared jobs: another coordinator may take them at once; bounded, as a stop must be
                await asyncio.wait_for(self._db(store.release), STOP_DB_S)
                await asyncio.wait_for(self._db(store.close), STOP_DB_S)
            except Exception as exc:  # noqa: BLE001 - the claims lapse by themselves
                log.warning("jobs: the store was not closed cleanly (%s); claims lapse by themselves", exc)
        self._thread.shutdown(wait=False)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def opened(self) -> JobStore:
        if self.store is None:
            if self.url is not None and not self._stopping:  # not reached yet: the same code as an outage
                raise Unavailable(self.off)
            raise FailedPrecondition(self.off or "jobs are off on this coordinator")
        return self.store

    # -- the API's side ---------------------------------------------------------------------------------
    async def submit(self, owner: str, label: str, items: list[NewItem], models: list[str]) -> str:
        store = self.opened()
        await self._check_room(store, owner)
        limit = self.fleet.config.max_unfinished_jobs
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        if not await self._db(store.create, job_id, owner, label, items, models, time.time(), limit):
            raise ResourceExhausted(f"{limit} jobs are unfinished (max_unfinished_jobs); wait for one to finish "
                                    "or cancel one")
        self._wake.set()
        return job_id

    async def _check_room(self, store: JobStore, owner: str) -> None:
        """ResourceExhausted naming the quota when the store's results, or the owner's, are at their bound."""
        config = self.fleet.config
        for quota_mb, who, name in ((config.jobs_max_mb, None, "jobs_max_mb"),
                                    (config.jobs_key_max_mb, owner, "jobs_key_max_mb")):
            if not quota_mb or (who is not None and not who):
                continue
            held = await self._db(store.result_bytes, who)
            if held >= quota_mb * 2**20:
                whose = "the job store keeps" if who is None else f"the jobs of key {who!r} keep"
                raise ResourceExhausted(f"{whose} {held / 2**20:.3g} MiB of results, the quota ({name} "
                                        f"{quota_mb:g} MiB): new jobs are refused until results expire "
                                        f"(job_result_ttl_s {self.ttl_s:g} s); fetch what you need, then retry")

    async def job(self, job_id: str) -> JobRow:
        """The job, or NotFound."""
        row = await self._db(self.opened().job, job_id)
        if row is None:
            raise NotFound(f"no job {job_id[:64]!r} on this coordinator (`coordinator jobs status` lists yours)")
        return row

    def check_kept(self, row: JobRow) -> None:
        """NotFound saying when, once the job's results expired."""
        if row.state == "expired" or (row.expires and row.expires <= time.time()):
            job_id = row.job_id
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row.expires))
            raise NotFound(f"job {job_id} expired at {when}: its results were kept {self.ttl_s:g} s after it "
                           "finished (job_result_ttl_s)")

    def message(self, row: JobRow) -> str:
        running = self._running.get(row.job_id)
        return running.waiting if running is not None and running.waiting else row.message

    async def counts(self) -> tuple[int, int]:
        """Jobs unfinished, and their items in flight now (0, 0 while jobs are off)."""
        if self.store is None:
            return 0, 0
        running = sum(len(r.tasks) for r in self._running.values())
        try:
            unfinished = await self._db(self.store.unfinished_count)
        except Unavailable as exc:  # the shared database is away: the status says so, and nothing else fails
            self.away = exc.message
            return 0, running
        self.away = ""
        return unfinished, running

    async def jobs(self, owners: tuple[str, ...] | None, limit: int) -> list[JobRow]:
        return await self._db(self.opened().jobs, owners, limit)

    async def items(self, job_id: str, offset: int, limit: int, max_bytes: int = 0) -> list[Any]:
        return await self._db(self.opened().items, job_id, offset, limit, max_bytes)

    async def cancel(self, job_id: str) -> None:
        """Stop the job: items in flight end now (their streams leave the batch and their KV caches are
        freed on every stage), pending items are cancelled."""
        store = self.opened()
        self._later.pop(job_id, None)
        running = self._running.get(job_id)
        if running is not None:
            running.cancelled = True
            tasks = list(running.tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._db(store.finish, job_id, "cancelled", time.time(), self.ttl_s, "cancelled by the caller")
        if running is not None and not running.started_all:
            return  # its start loop sees the flag and ends
        self._running.pop(job_id, None)

    # -- the runner -------------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        while True:
            try:
                if self.store is None:
                    await self._open_shared()
                    log.info("jobs: %d unfinished job(s) go on", len(await self._db(self.opened().unfinished)))
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:  # the shared jobs database is away: said, and tried again
                log.warning("jobs: %s; the runner tries again in 1 s", exc.message)
                await asyncio.sleep(1)
            except Exception:  # noqa: BLE001 - logged with its traceback; the runner goes on
                log.exception("the job runner failed; it starts again in 1 s")
                await asyncio.sleep(1)

    async def _serve(self) -> None:
        """The runner and the keeper of its claims, ended together when either fails (with its error)."""
        tasks = [asyncio.create_task(self._run(), name="jobs: runner"),
                 asyncio.create_task(self._keep_claims(), name="jobs: claims")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_claims(self) -> None:
        """Renew the claims of the items in flight (shared jobs; nothing to do on SQLite)."""
        store = self.opened()
        while store.claims:
            await asyncio.sleep(RENEW_EVERY_S)
            if any(r.tasks for r in self._running.values()):
                try:
                    await self._db(store.renew)
                except Unavailable as exc:  # a blip: the claims hold CLAIM_S (8 s), the next renewal may pass
                    log.warning("jobs: claims not renewed (%s); trying again in %.0f s", exc.message, RENEW_EVERY_S)

    async def _run(self) -> None:
        store = self.opened()
        next_expiry = 0.0
        while True:
            if time.monotonic() >= next_expiry:
                if n := await self._db(store.expire, time.time()):
                    log.info("jobs: the results of %d job(s) expired", n)
                next_expiry = time.monotonic() + EXPIRY_EVERY_S
            self._wake.clear()
            started = False
            unfinished = await self._db(store.unfinished)
            self._later = {j: t for j, t in self._later.items() if j in unfinished}  # finished or cancelled: gone
            for job_id in unfinished:
                if job_id not in self._running and self._later.get(job_id, 0.0) <= time.monotonic():
                    self._later.pop(job_id, None)
                    await self._start(store, job_id)
                    started = True
            if not started:
                now = time.monotonic()
                wait = min([EXPIRY_EVERY_S, *(t - now for t in self._later.values() if t > now)])
                try:
                    await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))
                except TimeoutError:
                    pass

    async def _start(self, store: JobStore, job_id: str) -> None:
        """Start the job's pending items as slots free up (returns once every one has started)."""
        running = self._running[job_id] = Running()
        try:
            row = await self._db(store.job, job_id)
            running.owner = row.owner if row is not None else ""
            await self._db(store.set_state, job_id, "running")
            after = -1
            while not running.cancelled:
                batch = await self._db(store.pending, job_id, after, BATCH)
                if not batch:
                    break
                for index, blob, seeded_here in batch:
                    await self._slots.acquire()
                    if running.cancelled or (store.claims and not await self._db(store.claim, job_id, index)) \
                            or running.cancelled:  # (again: a cancel may come while the claim is made)
                        self._slots.release()  # cancelled, or another coordinator runs the item now
                        if running.cancelled:
                            break
                        continue
                    task = asyncio.create_task(self._item(job_id, running, index, blob, seeded_here),
                                               name=f"{job_id}[{index}]")
                    running.tasks.add(task)
                    task.add_done_callback(functools.partial(self._item_done, job_id, running))
                after = batch[-1][0]
        except BaseException:
            running.cancelled = True  # its items in flight end; the job is started again from the database
            for task in running.tasks:
                task.cancel()
            self._running.pop(job_id, None)
            raise
        running.started_all = True
        if not running.tasks:
            await self._complete(job_id, running)

    def _item_done(self, job_id: str, running: Running, task: asyncio.Task[None]) -> None:
        self._slots.release()
        running.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # its result could not be stored
            log.error("job %s: %s failed (it runs again)", job_id, task.get_name(), exc_info=exc)
        if running.started_all and not running.tasks and not running.cancelled and not self._stopping:
            done = asyncio.create_task(self._complete(job_id, running))
            running.tasks.add(done)  # held (and cancelled at stop) like the items
            done.add_done_callback(running.tasks.discard)

    async def _complete(self, job_id: str, running: Running) -> None:
        try:
            store = self.opened()
            if running.cancelled:
                return
            if await self._db(store.remaining, job_id):  # an item whose result could not be stored, or one
                self._later[job_id] = time.monotonic() + RETRY_S  # another coordinator holds: tried again
                return
            row = await self._db(store.job, job_id)
            failed = row.counts.get("failed", 0) if row is not None else 0
            await self._db(store.finish, job_id, "completed", time.time(), self.ttl_s,
                           f"{failed} item(s) failed" if failed else "")
            log.info("job %s completed", job_id)
        finally:
            self._running.pop(job_id, None)
            self._wake.set()

    async def _item(self, job_id: str, running: Running, index: int, blob: bytes, seeded_here: bool) -> None:
        item = coordinator_pb2.JobItem.FromString(blob)
        began = time.monotonic()
        delay, give_up = 0.5, began + MAX_ITEM_WAIT_S
        while True:
            try:
                result = await self._execute(item, cache_ok=not seeded_here, tenant=running.owner)
                state = "done"
                running.waiting = ""
                running.missing.pop(_pinned(item), None)
                break
            except (*WAITS, NotFound) as exc:  # the cluster cannot serve now: wait (with back-off), bounded
                # NotFound: the version the item is pinned to is not deployed (not back yet after a restart,
                # or unloaded): it waits up to MAX_VERSION_WAIT_S for it, then fails naming it
                model = _pinned(item)
                if isinstance(exc, NotFound):  # the wait is the job's for that version, not each item's own
                    limit, since = MAX_VERSION_WAIT_S, running.missing.setdefault(model, time.monotonic())
                    running.waiting = f"waiting for {model}: {exc.message}"
                else:
                    limit, since = MAX_ITEM_WAIT_S, began
                    running.waiting = f"waiting: {exc.message}"
                if time.monotonic() + delay > min(give_up, since + limit):
                    why = f" (waited {limit:.0f} s for {model})" if isinstance(exc, NotFound) \
                        else f" (for {MAX_ITEM_WAIT_S:.0f} s)"
                    result, state = failed(exc, why), "failed"
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
            except ShardlineError as exc:  # the item's own fault: it fails alone
                result, state = failed(exc), "failed"
                break
            except Exception:  # noqa: BLE001 - a bug: logged with its traceback, the item fails alone
                log.exception("job %s: item %d failed", job_id, index)
                result, state = failed(Internal("internal error; the coordinator's log has the details")), "failed"
                break
        result.index, result.custom_id, result.state = index, item.custom_id, state
        await self._store_result(job_id, running, index, state, result)

    async def _store_result(self, job_id: str, running: Running, index: int, state: str,
                            result: coordinator_pb2.JobItemResult) -> None:
        """Write the item's result, retrying a store that cannot take it now (disk full, a locked file) with
        back-off for up to STORE_RETRY_S, said in the job's status and counted in the metrics; the result is
        never computed again for it. Past that, the error is raised (the item runs again later)."""
        blob, delay, give_up = result.SerializeToString(), 0.5, time.monotonic() + STORE_RETRY_S
        while True:
            try:
                if not await self._db(self.opened().finish_item, job_id, index, state, blob, result.cached):
                    log.warning("job %s: item %d was finished or taken by another coordinator meanwhile (this "
                                "one's claim lapsed): its result here is dropped", job_id, index)
                if running.waiting.startswith(STORE_WAIT):
                    running.waiting = ""
                return
            except (sqlite3.Error, OSError, Unavailable) as exc:
                self.fleet.metrics.job_storage_errors.inc()
                running.waiting = f"{STORE_WAIT} (retrying): {exc}"
                log.warning("job %s: the result of item %d could not be stored (%s); retrying in %.1f s", job_id,
                            index, exc, delay)
                if time.monotonic() + delay > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _execute(self, item: coordinator_pb2.JobItem, cache_ok: bool,
                       tenant: str = "") -> coordinator_pb2.JobItemResult:
        result = coordinator_pb2.JobItemResult()
        if item.WhichOneof("request") == "infer":
            async with self._infer_slot:
                vectors, _ = await infer(self.fleet, embed_request(item.infer), _log_id(item.custom_id))
            fill_tensor(result.embeddings, from_numpy(vectors))
            return result
        req = generation_request(item.generate)
        texts: list[str] = []
        cache = self.cache if cache_ok else ResultCache(0)
        async for piece in generate(self.fleet, cache, req, f"job-{uuid.uuid4().hex}", background=True, tenant=tenant,
                                    client_id=_log_id(item.custom_id)):
            texts.append(piece.text)
            result.token_ids.extend(piece.token_ids)
            if piece.finish_reason:
                result.finish_reason = FINISH[piece.finish_reason]
                result.usage.prompt_tokens = piece.prompt_tokens
                result.usage.completion_tokens = piece.completion_tokens
                result.cached = piece.cached
        result.text = "".join(texts)
        return result


def _pinned(item: coordinator_pb2.JobItem) -> str:
    """The name@version an item was pinned to at submission."""
    return item.generate.model if item.WhichOneof("request") == "generate" else item.infer.model


def _log_id(custom_id: str) -> str:
    """A job item's custom_id as its request log line's client_id (the line quotes what is not plain)."""
    return custom_id[:MAX_REQUEST_ID_CHARS]
