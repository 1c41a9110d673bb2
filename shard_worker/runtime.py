"""The compute side of a worker: sessions, validation of a step against them, and one compute thread.

Runtime code never sees protobuf: the servicer hands it a Step and gets a StepResult back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from shard_worker.kv_cache import SessionCache
from shard_worker.sampling import Sampling, sample
from shard_worker.stage import Packing, Stage
from shardline.codec import RawTensor
from shardline.errors import InvalidArgument, NotFound

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTPUTS = ("tokens", "logits", "last_logits", "hidden")
MAX_TOMBSTONES = 65_536


@dataclass(frozen=True)
class Slice:
    session_id: str
    start: int
    count: int
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Step:
    sequences: list[Slice]
    token_ids: list[int] | None = None
    hidden: RawTensor | None = None
    output: str = "tokens"


@dataclass(frozen=True)
class StepResult:
    token_ids: list[int] | None = None
    tensor: RawTensor | None = None


def raw_from_torch(t: torch.Tensor) -> RawTensor:
    dtype = str(t.dtype).removeprefix("torch.")
    data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return RawTensor(dtype, tuple(t.shape), data)


def torch_from_raw(raw: RawTensor) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only wire bytes: the stage never writes its input
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(raw.data, dtype=TORCH_DTYPES[raw.dtype]) if raw.data else torch.empty(
            0, dtype=TORCH_DTYPES[raw.dtype])
    return flat.view(raw.shape)


@dataclass
class Metrics:
    """What a stage has done since it was loaded (the compute thread writes; the status reads)."""

    started: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0
    steps: int = 0
    tokens: int = 0
    queued: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class StageRuntime:
    """Owns a stage and its sessions. Every method runs on the compute thread, one step at a time."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.sessions: dict[str, SessionCache] = {}
        # recently ended sessions: a step for one of them (a late step released by a link that had stalled)
        # must not create its cache again. Session ids are never reused: a replay takes a new one.
        self.ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.metrics = Metrics()

    @property
    def kv_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    def end_sessions(self, session_ids: list[str]) -> int:
        for sid in session_ids:
            self.ended[sid] = None
            self.ended.move_to_end(sid)
        while len(self.ended) > MAX_TOMBSTONES:
            self.ended.popitem(last=False)
        return sum(self.sessions.pop(sid, None) is not None for sid in session_ids)

    def validate(self, step: Step) -> list[SessionCache]:
        """Check a step completely before touching any cache; returns each sequence's cache (new ones are
        not registered until the step succeeds)."""
        stage = self.stage
        if not step.sequences:
            raise InvalidArgument("sequences is empty")
        if step.output not in OUTPUTS:
            raise InvalidArgument(f"output {step.output!r} is not one of {OUTPUTS}")
        if not stage.causal:
            nonzero = [i for i, s in enumerate(step.sequences) if s.start != 0]
            if nonzero:
                raise InvalidArgument(f"sequences[{nonzero[0]}].start_position must be 0: an encoder keeps no cache")
            if stage.is_last and step.output != "hidden":
                raise InvalidArgument(f"output {step.output!r}: an encoder has no LM head; ask for hidden states")
        seen: set[str] = set()
        caches: list[SessionCache] = []
        for i, seq in enumerate(step.sequences):
            where = f"sequences[{i}]"
            if not seq.session_id:
                raise InvalidArgument(f"{where}.session_id is empty")
            if seq.session_id in self.ended:
                raise NotFound(f"{where}.session_id {seq.session_id!r} has ended on this stage")
            if seq.session_id in seen:
                raise InvalidArgument(f"{where}.session_id {seq.session_id!r} appears twice in one batch")
            seen.add(seq.session_id)
            if seq.count < 1:
                raise InvalidArgument(f"{where}.num_tokens must be at least 1, got {seq.count}")
            if seq.start < 0:
                raise InvalidArgument(f"{where}.start_position must be >= 0, got {seq.start}")
            if stage.max_positions and seq.start + seq.count > stage.max_positions:
                raise InvalidArgument(f"{where} ends at position {seq.start + seq.count}, beyond the model's "
                                      f"{stage.max_positions} positions")
            cache = self.sessions.get(seq.session_id) if stage.causal else stage.new_session()
            if cache is None:
                if seq.start != 0:
                    raise NotFound(f"{where}.session_id {seq.session_id!r} has no cache on this stage "
                                   f"(start_position {seq.start}; a new session starts at 0)")
                cache = stage.new_session()
            elif seq.start > cache.length:
                raise InvalidArgument(f"{where}.start_position {seq.start} does not follow session "
                                      f"{seq.session_id!r}, whose cache holds {cache.length} positions")
            s = seq.sampling
            if s.temperature < 0 or s.top_k < 0 or not 0.0 <= s.top_p <= 1.0:
                raise InvalidArgument(f"{where}.sampling is out of range (temperature >= 0, top_k >= 0, "
                                      f"0 <= top_p <= 1): {s}")
            caches.append(cache)
        total = sum(seq.count for seq in step.sequences)
        if stage.is_first:
            if step.token_ids is None or len(step.token_ids) != total:
                got = "none" if step.token_ids is None else len(step.token_ids)
                raise InvalidArgument(f"token_ids: the first stage needs {total} (sum of num_tokens), got {got}")
            bad = [t for t in step.token_ids if not 0 <= t < stage.vocab_size]
            if bad:
                raise InvalidArgument(f"token_ids: {bad[0]} is outside the vocabulary [0, {stage.vocab_size})")
        else:
            h = step.hidden
            if h is None:
                raise InvalidArgument(f"hidden is missing: stage [{stage.start}, {stage.end}) takes hidden states")
            want_dtype = str(stage.dtype).removeprefix("torch.")
            if h.dtype != want_dtype:
                raise InvalidArgument(f"hidden.dtype is {h.dtype}, this stage computes in {want_dtype}")
            if h.shape != (total, stage.hidden_size):
                raise InvalidArgument(f"hidden.shape is {list(h.shape)}, expected [{total}, {stage.hidden_size}] "
                                      "(sum of num_tokens, hidden size)")
        return caches

    def step(self, step: Step) -> StepResult:
        began = time.perf_counter()
        try:
            return self._step(step)
        finally:
            self.metrics.busy_s += time.perf_counter() - began
            self.metrics.steps += 1
            self.metrics.tokens += sum(s.count for s in step.sequences)

    def _step(self, step: Step) -> StepResult:
        caches = self.validate(step)
        packing = Packing([s.start for s in step.sequences], [s.count for s in step.sequences])
        token_ids = torch.tensor(step.token_ids, dtype=torch.long) if step.token_ids is not None else None
        hidden = torch_from_raw(step.hidden) if step.hidden is not None else None
        out = self.stage.forward(caches, packing, token_ids, hidden)
        if self.stage.causal:
            for seq, cache in zip(step.sequences, caches, strict=True):
                self.sessions[seq.session_id] = cache
        if not self.stage.is_last or step.output == "hidden":
            return StepResult(tensor=raw_from_torch(out))
        if step.output == "logits":
            return StepResult(tensor=raw_from_torch(self.stage.logits(out)))
        last_rows = torch.tensor(packing.counts).cumsum(0) - 1
        logits = self.stage.logits(out[last_rows])
        if step.output == "last_logits":
            return StepResult(tensor=raw_from_torch(logits))
        positions = [s.start + s.count for s in step.sequences]
        return StepResult(token_ids=sample(logits, [s.sampling for s in step.sequences], positions))


T = TypeVar("T")


class ComputeThread:
    """The worker's single compute thread: steps run one at a time, in the order they were submitted."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
