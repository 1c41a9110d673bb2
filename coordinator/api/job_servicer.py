"""The jobs API (SubmitJob, GetJob, ListJobs, CancelJob): every item checked at submission exactly as the
interactive RPC would check it, then stored; protobuf <-> the job runner.

A job belongs to the API key that submitted it: other keys do not see it (NOT_FOUND, as for a job that does
not exist), except keys with role admin. Without API keys every caller sees every job."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from coordinator.fleet.requests import plan_generation, plan_infer
from coordinator.jobs.store import JobRow, NewItem
from coordinator.wire import embed_request, generation_request
from shardline.auth import KEYLESS, KeyEntry
from shardline.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShardlineError,
    Unauthenticated,
    Unavailable,
    grpc_errors,
)
from shardline.v1 import coordinator_pb2

if TYPE_CHECKING:
    from coordinator.fleet.fleet import Fleet
    from coordinator.jobs.runner import JobRunner
    from shardline.auth import ApiKeys

MAX_LABEL_CHARS = 256
MAX_CUSTOM_ID_CHARS = 256
MAX_JOB_ID_CHARS = 64
MAX_PAGE = 1000
MAX_PAGE_BYTES = 32 * 2**20  # a page of results stops growing past this (the SDK takes 64 MiB)


def job_info(row: JobRow, message: str) -> coordinator_pb2.JobInfo:
    c = row.counts
    return coordinator_pb2.JobInfo(
        job_id=row.job_id, state=row.state, label=row.label, total=row.total, done=c.get("done", 0),
        failed=c.get("failed", 0), cancelled=c.get("cancelled", 0), created_unix_ms=int(row.created * 1000),
        finished_unix_ms=int(row.finished * 1000), expires_unix_ms=int(row.expires * 1000), message=message,
        models=list(row.models), cached=row.cached)


async def checked_item(fleet: Fleet, default_model: str, item: Any, where: str) -> tuple[NewItem, str]:
    """The item as it is stored: checked like the RPC it stands for, pinned to the model version it runs on
    (and, when sampled without a seed, to a seed chosen now, so that a run after a restart gives the same
    result). Returns it with its name@version."""
    kind = item.WhichOneof("request")
    if kind is None:
        raise InvalidArgument(f"{where} has no request: give generate or infer")
    if len(item.custom_id) > MAX_CUSTOM_ID_CHARS:
        raise InvalidArgument(f"{where}: custom_id is {len(item.custom_id)} characters; the limit is "
                              f"{MAX_CUSTOM_ID_CHARS}")
    stored = coordinator_pb2.JobItem()
    stored.CopyFrom(item)
    stored.ClearField("source_line")
    seeded_here = False
    try:
        if kind == "generate":
            g = stored.generate
            unsupported = [name for name, on in (("n", g.n > 1), ("tools", bool(g.tools)),
                                                 ("logprobs", g.HasField("logprobs")),
                                                 ("prompt_logprobs", g.HasField("prompt_logprobs"))) if on]
            if unsupported:  # a job's result holds one text and its ids
                raise InvalidArgument(f"{unsupported[0]} is not taken in a job's items (a result is one text and "
                                      "its token ids): send it as a Generate call")
            g.model = g.model or default_model
            deployment, plan = await plan_generation(fleet, generation_request(g))
            if plan.sampling.temperature != 0 and not g.HasField("seed"):
                g.seed, seeded_here = random.getrandbits(63), True
            g.model = deployment.key
        else:
            r = stored.infer
            r.model = r.model or default_model
            deployment = (await plan_infer(fleet, embed_request(r), serving=False)).deployment
            r.model = deployment.key
    except (Unavailable, ResourceExhausted) as exc:  # the cluster's state now: the job may be sent again
        raise type(exc)(f"{where}: {exc.message}") from None
    except ShardlineError as exc:  # an unknown model, a model of another task, a bad value: the line is bad
        raise InvalidArgument(f"{where}: {exc.message}") from None
    return NewItem(item.custom_id, stored.SerializeToString(), seeded_here), deployment.key


class JobMethods:
    fleet: Fleet
    jobs: JobRunner
    api_keys: ApiKeys | None

    def caller(self, context: Any) -> tuple[str, bool]:
        """Whose call: the caller's id (its key's or certificate's; never its name, which a new key may take
        after a revoke; empty without keys) and whether it is an admin (everyone is, without keys)."""
        if self.api_keys is None:
            return "", True
        entry = self.key_of(context)
        return (entry.id, entry.role == "admin") if entry is not None else ("", False)

    def owners(self, context: Any) -> tuple[tuple[str, ...], bool]:
        """The owners whose jobs the caller sees (its id; and its name for jobs stored before jobs were owned by
        ids: an upgrade keeps them its own), and whether it sees every job (an admin)."""
        if self.api_keys is None:
            return ("",), True
        entry = self.key_of(context)
        if entry is None:
            return ("",), False
        legacy = (entry.name,) if entry.id != KEYLESS else ()
        return (entry.id, *legacy), entry.role == "admin"

    def key_of(self, context: Any) -> KeyEntry | None:
        """The caller's entry (its name, role and quotas): its API key's, else its client certificate's; None
        without keys."""
        if self.api_keys is None:
            return None
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return self.api_keys.caller(metadata, context.auth_context())

    def still_admitted(self, context: Any) -> None:
        """A long call's caller judged again (the keys file is read again within a second of a change): a key or
        certificate revoked while its stream is open is refused at the stream's next request."""
        if self.api_keys is not None and self.key_of(context) is None:
            raise Unauthenticated("the API key (or client certificate) this stream was opened with is no longer "
                                  "valid (revoked): its requests are refused; open a stream with a valid key")

    async def _own(self, job_id: str, context: Any) -> JobRow:
        if not job_id:
            raise InvalidArgument("job_id is empty (submitting returned it; `coordinator jobs status`, or ListJobs, "
                                  "shows yours)")
        if len(job_id) > MAX_JOB_ID_CHARS:
            raise InvalidArgument(f"job_id is {len(job_id)} characters; job ids have at most {MAX_JOB_ID_CHARS}")
        row = await self.jobs.job(job_id)
        owners, admin = self.owners(context)
        if not admin and row.owner not in owners:  # another key's job: as if there were none
            raise NotFound(f"no job {job_id!r} on this coordinator (`coordinator jobs status`, or ListJobs, shows "
                           "yours)")
        self.jobs.check_kept(row)
        return row

    @grpc_errors
    async def SubmitJob(self, request: Any, context: Any) -> coordinator_pb2.SubmitJobResponse:
        config = self.fleet.config
        if not request.items:
            raise InvalidArgument("the job has no items")
        if len(request.items) > config.max_job_items:
            raise InvalidArgument(f"the job has {len(request.items)} items; the limit is {config.max_job_items} "
                                  "(max_job_items): split it")
        if len(request.label) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"label is {len(request.label)} characters; the limit is {MAX_LABEL_CHARS}")
        self.jobs.opened()  # jobs off: say so before checking thousands of items
        items: list[NewItem] = []
        models: dict[str, None] = {}
        for i, item in enumerate(request.items):
            where = f"line {item.source_line} (item {i})" if item.source_line else f"item {i}"
            new, model = await checked_item(self.fleet, request.model, item, where)
            items.append(new)
            models[model] = None
        owner, _ = self.caller(context)
        job_id = await self.jobs.submit(owner, request.label, items, list(models))
        return coordinator_pb2.SubmitJobResponse(job_id=job_id, items=len(items))

    @grpc_errors
    async def GetJob(self, request: Any, context: Any) -> coordinator_pb2.GetJobResponse:
        if request.offset < 0 or request.limit < 0:
            raise InvalidArgument(f"offset and limit must be >= 0, got {request.offset} and {request.limit}")
        row = await self._own(request.job_id, context)
        response = coordinator_pb2.GetJobResponse(job=job_info(row, self.jobs.message(row)))
        if request.results:
            limit = min(request.limit or MAX_PAGE, MAX_PAGE)
            rows = await self.jobs.items(row.job_id, request.offset, limit, MAX_PAGE_BYTES)  # stops at the cap
            size = 0
            for r in rows:
                result = response.results.add()
                if r.result is not None:
                    result.ParseFromString(r.result)
                    size += len(r.result)
                result.index, result.custom_id, result.state = r.index, r.custom_id, r.state
            shown = len(response.results)
            if request.offset + shown < row.total and (size > MAX_PAGE_BYTES or len(rows) == limit):
                response.next_offset = request.offset + shown
        return response

    @grpc_errors
    async def ListJobs(self, request: Any, context: Any) -> coordinator_pb2.ListJobsResponse:
        if not 0 <= request.limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be between 0 and {MAX_PAGE}, got {request.limit}")
        owners, admin = self.owners(context)
        rows = await self.jobs.jobs(None if admin else owners, request.limit or 100)
        return coordinator_pb2.ListJobsResponse(jobs=[job_info(r, self.jobs.message(r)) for r in rows])

    @grpc_errors
    async def CancelJob(self, request: Any, context: Any) -> coordinator_pb2.CancelJobResponse:
        row = await self._own(request.job_id, context)
        if row.state in ("queued", "running"):
            await self.jobs.cancel(row.job_id)
            row = await self.jobs.job(row.job_id)
        return coordinator_pb2.CancelJobResponse(job=job_info(row, self.jobs.message(row)))
