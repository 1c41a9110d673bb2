"""The compute side of a worker: sessions, validation of a step against them, and one compute thread.

Runtime code never sees protobuf: the servicer hands it a Step and gets a StepResult back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from shard_worker.device import init_thread, to_device
from shard_worker.kv_cache import KVPool, SessionCache
from shard_worker.prefix_cache import PrefixStore, check_hashes
from shard_worker.sampling import Sampling, sample
from shard_worker.scoring import PromptScorer, SequenceScores, adjust, changes_logits, scores
from shard_worker.stage import Packing, Stage
from shard_worker.wire import check_hidden, decode_hidden, encode_hidden, raw_from_torch
from shardline.codec import RawTensor
from shardline.errors import FailedPrecondition, InvalidArgument, NotFound, ShardlineError
from shardline.scores import TokenScore

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTPUTS = ("tokens", "logits", "last_logits", "hidden")
MAX_TOMBSTONES = 65_536


@dataclass(frozen=True)
class Slice:
    session_id: str
    start: int
    count: int
    sampling: Sampling = field(default_factory=Sampling)
    prefix_blocks: tuple[bytes, ...] = ()  # chain hashes of the session's full blocks (shard_worker/prefix_cache.py)
    prefix_tokens: int = 0  # a new session's positions [0, prefix_tokens) come from the prefix store
    ids: tuple[int, ...] | None = None  # the slice's own ids, when the last stage needs them (Sampling.needs_ids)
    allowed: bytes = b""  # structured output: the ids its sample may take, a bitmask (SequenceSlice.allowed_tokens)
    fork_from: str = ""  # a new session starting as a copy of this one's positions [0, start)


@dataclass(frozen=True)
class Step:
    sequences: list[Slice]
    token_ids: list[int] | None = None
    hidden: RawTensor | None = None
    output: str = "tokens"
    hidden_scale: RawTensor | None = None  # int8 hidden states: a float32 scale per row
    send_on: bool = False  # the output goes on to the next stage (in the link's wire dtype), not to the caller


@dataclass(frozen=True)
class StepResult:
    """Results for the sequences that went through, in step order; `errors` holds those that failed (session
    id, error): a sequence's own fault never fails its neighbours."""

    token_ids: list[int] | None = None
    tensor: RawTensor | None = None
    errors: list[tuple[str, ShardlineError]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # indexes of the sequences that went through
    scale: RawTensor | None = None  # with an int8 `tensor`: its per-row scale (ForwardRequest.hidden_scale)
    scores: list[SequenceScores] | None = None  # one per token id, when a sequence asked for log probabilities


@dataclass(frozen=True)
class KVSettings:
    """What LoadShard tells a stage about the steps it will get and how to hold KV memory."""

    max_step_tokens: int = 2048
    max_step_sequences: int = 64
    prefill_chunk_tokens: int = 256
    block_tokens: int = 16
    session_ttl_s: float = 600.0


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
    sessions_expired: int = 0
    bubble_s: float = 0.0  # idle while a live session's stream was elsewhere in the pipeline (shard_worker/metrics.py)
    prefill_tokens: int = 0  # positions computed in prompt chunks (more than one token, or from position 0)
    prefix_reused: int = 0  # positions copied from the prefix store instead of computed
    prefix_evictions: int = 0  # prefix blocks evicted to make room


class StageRuntime:
    """Owns a stage, its KV pool and its sessions. Every method runs on the compute thread, one step at a
    time."""

    def __init__(self, stage: Stage, pool: KVPool, settings: KVSettings | None = None, headroom_bytes: int = 0,
                 budget_bytes: int = 0) -> None:
        self.stage, self.pool = stage, pool
        self.settings = settings or KVSettings()
        self.headroom_bytes, self.budget_bytes = headroom_bytes, budget_bytes
        self.sessions: dict[str, SessionCache] = {}
        self.prefix = PrefixStore(pool)  # prompt prefixes kept in the free KV blocks (README "Prefix cache")
        # the last stage's sessions whose sampling needs their ids (penalties, prompt log probabilities): every
        # id fed so far, and the prompt rows whose next id comes with the next slice (shard_worker/scoring.py)
        self.history: dict[str, list[int]] = {}
        self.prompts = PromptScorer()
        self.last_step: dict[str, float] = {}  # session id -> monotonic time of its last step
        # recently ended sessions: a step for one of them (a late step released by a link that had stalled)
        # must not create its cache again. Session ids are never reused: a replay takes a new one.
        self.ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.metrics = Metrics()
        self.closed = False
        self.on_step: Callable[[float], None] | None = None  # each step's seconds (the metrics' histogram)
        self._idle_since = time.perf_counter()  # the compute thread's last operation ended then
        # the dtype hidden states go to the next stage in (shardline/wire_dtype.py); the compute dtype by default
        self.wire_dtype = str(stage.dtype).removeprefix("torch.")

    @property
    def kv_bytes(self) -> int:
        return self.pool.bytes_used

    def _idle_until(self, now: float) -> None:
        """Bubble accounting, on the compute thread (so no lock): the thread was idle since `_idle_since`;
        with a live session all along (sessions change only on this thread), that idle time was a bubble."""
        if self.sessions:
            self.metrics.bubble_s += now - self._idle_since
        self._idle_since = now

    def end_sessions(self, session_ids: list[str]) -> int:
        self._idle_until(time.perf_counter())  # before the sessions it ends: they were live until now
        for sid in session_ids:
            self.ended[sid] = None
            self.ended.move_to_end(sid)
        while len(self.ended) > MAX_TOMBSTONES:
            self.ended.popitem(last=False)
        freed = 0
        for sid in session_ids:
            cache = self.sessions.pop(sid, None)
            self.last_step.pop(sid, None)
            self.history.pop(sid, None)
            self.prompts.forget(sid)
            if cache is not None:
                cache.release()
                freed += 1
        return freed

    def close(self) -> int:
        """Free all this runtime holds (UnloadShard, after the steps queued before it): every session's KV
        cache, and the stage's weights, which go even if a stray reference to the runtime outlives it. It
        takes no step afterwards. Returns how many sessions were ended."""
        ended = len(self.sessions)
        for cache in self.sessions.values():
            cache.release()
        self.sessions.clear()
        self.last_step.clear()
        self.history.clear()
        self.prompts.clear()
        self.ended.clear()
        self.prefix.clear()
        self.closed = True
        self.stage.release()
        return ended

    def expire(self, now: float | None = None) -> int:
        """Free the sessions with no step for the TTL (their streams were abandoned without EndSession)."""
        now = time.monotonic() if now is None else now
        idle = [sid for sid, t in self.last_step.items() if now - t > self.settings.session_ttl_s]
        freed = self.end_sessions(idle)
        self.metrics.sessions_expired += freed
        return freed

    def _check_step(self, step: Step) -> None:
        """What makes the whole message unusable (its shape, not one sequence's values)."""
        stage = self.stage
        if not step.sequences:
            raise InvalidArgument("sequences is empty")
        if step.output not in OUTPUTS:
            raise InvalidArgument(f"output {step.output!r} is not one of {OUTPUTS}")
        if not stage.causal and stage.is_last and step.output != "hidden":
            raise InvalidArgument(f"output {step.output!r}: an encoder has no LM head; ask for hidden states")
        counts = [seq.count for seq in step.sequences]
        bad = next((i for i, n in enumerate(counts) if n < 1), None)
        if bad is not None:
            raise InvalidArgument(f"sequences[{bad}].num_tokens must be at least 1, got {counts[bad]}")
        total = sum(counts)
        if stage.causal and len(counts) > self.settings.max_step_sequences:
            raise InvalidArgument(f"the step carries {len(counts)} sequences; this stage takes at most "
                                  f"{self.settings.max_step_sequences} (max_step_sequences)")
        if stage.causal and total > self.settings.max_step_tokens:
            raise InvalidArgument(f"the step carries {total} tokens; this stage takes at most "
                                  f"{self.settings.max_step_tokens} (max_step_tokens)")
        if stage.is_first:
            if step.token_ids is None or len(step.token_ids) != total:
                got = "none" if step.token_ids is None else len(step.token_ids)
                raise InvalidArgument(f"token_ids: the first stage needs {total} (sum of num_tokens), got {got}")
        else:
            h = step.hidden
            if h is None:
                raise InvalidArgument(f"hidden is missing: stage [{stage.start}, {stage.end}) takes hidden states")
            check_hidden(h, step.hidden_scale, total)  # any wire dtype: converted to the compute dtype
            if h.shape != (total, stage.hidden_size):
                raise InvalidArgument(f"hidden.shape is {list(h.shape)}, expected [{total}, {stage.hidden_size}] "
                                      "(sum of num_tokens, hidden size)")

    def _check_sequence(self, i: int, seq: Slice, token_ids: list[int] | None) -> SessionCache:
        """One sequence's values against its session; returns its cache (a new one is not registered until
        the step succeeds)."""
        stage, where = self.stage, f"sequences[{i}]"
        if not seq.session_id:
            raise InvalidArgument(f"{where}.session_id is empty")
        if seq.session_id in self.ended:
            raise NotFound(f"{where}.session_id {seq.session_id!r} has ended on this stage")
        if seq.start < 0:
            raise InvalidArgument(f"{where}.start_position must be >= 0, got {seq.start}")
        if not stage.causal and seq.start != 0:
            raise InvalidArgument(f"{where}.start_position must be 0: an encoder keeps no cache")
        if seq.count > self.settings.prefill_chunk_tokens and stage.causal:
            raise InvalidArgument(f"{where}.num_tokens is {seq.count}; this stage takes at most "
                                  f"{self.settings.prefill_chunk_tokens} per sequence (prefill_chunk_tokens)")
        if stage.max_positions and seq.start + seq.count > stage.max_positions:
            raise InvalidArgument(f"{where} ends at position {seq.start + seq.count}, beyond the model's "
                                  f"{stage.max_positions} positions")
        self._check_sampling(where, seq)
        if token_ids is not None:
            bad = [t for t in token_ids if not 0 <= t < stage.vocab_size]
            if bad:
                raise InvalidArgument(f"token_ids of {where}: {bad[0]} is outside the vocabulary "
                                      f"[0, {stage.vocab_size})")
        if seq.prefix_blocks or seq.prefix_tokens:
            self._check_prefix(where, seq)
        if not stage.causal:
            return stage.new_session(self.pool)
        cache = self.sessions.get(seq.session_id)
        if cache is None and seq.fork_from:
            return self._fork(where, seq)
        if cache is None and seq.prefix_tokens:
            cache = stage.new_session(self.pool)
            self.prefix.start(where, cache, list(seq.prefix_blocks), seq.prefix_tokens, seq.start + seq.count)
            return cache
        if cache is None:
            if seq.start != 0:
                raise NotFound(f"{where}.session_id {seq.session_id!r} has no cache on this stage "
                               f"(start_position {seq.start}; a new session starts at 0)")
            cache = stage.new_session(self.pool)
        elif seq.prefix_tokens:
            raise InvalidArgument(f"{where}.prefix_tokens is {seq.prefix_tokens}, but session {seq.session_id!r} "
                                  f"already holds {cache.length} positions here: only a new session starts from "
                                  "the prefix store")
        elif seq.start > cache.length:
            raise InvalidArgument(f"{where}.start_position {seq.start} does not follow session "
                                  f"{seq.session_id!r}, whose cache holds {cache.length} positions")
        cache.reserve(seq.start + seq.count)  # ResourceExhausted when the pool is short: nothing taken
        return cache

    def _fork(self, where: str, seq: Slice) -> SessionCache:
        """A new session holding a copy of `fork_from`'s positions [0, start) (another choice of its prompt)."""
        parent = self.sessions.get(seq.fork_from)
        if parent is None:
            raise NotFound(f"{where}.fork_from {seq.fork_from!r} is not held on this stage (ended, or the worker "
                           "restarted): send the whole prefill")
        if seq.prefix_tokens or seq.start > parent.length or seq.start == 0:
            raise InvalidArgument(f"{where}: a fork starts within its parent's {parent.length} positions, after 0, "
                                  f"and not from the prefix store (start_position {seq.start})")
        cache = self.stage.new_session(self.pool)
        cache.reserve(seq.start + seq.count)  # ResourceExhausted when the pool is short: nothing taken
        try:
            for layer in range(len(cache.keys)):
                cache.keys[layer][:, : seq.start] = parent.keys[layer][:, : seq.start]
                cache.values[layer][:, : seq.start] = parent.values[layer][:, : seq.start]
        except BaseException:
            cache.release()  # not yet one of the step's caches
            raise
        cache.length = seq.start
        return cache

    def _check_sampling(self, where: str, seq: Slice) -> None:
        s, vocab = seq.sampling, self.stage.vocab_size
        floats = (s.temperature, s.top_p, s.min_p, s.repetition_penalty, s.frequency_penalty, s.presence_penalty)
        if not all(math.isfinite(v) for v in floats) or s.temperature < 0 or s.top_k < 0 \
                or not 0.0 <= s.top_p <= 1.0 or not 0.0 <= s.min_p <= 1.0 or s.repetition_penalty <= 0:
            raise InvalidArgument(f"{where}.sampling is out of range (finite temperature >= 0, top_k >= 0, "
                                  f"0 <= top_p <= 1, 0 <= min_p <= 1, repetition_penalty > 0): {s}")
        for k in (s.logprobs, s.prompt_logprobs):
            if k is not None and not 0 <= k <= vocab:
                raise InvalidArgument(f"{where}.sampling asks for {k} best log probabilities; 0 .. {vocab}")
        bad = next((i for i, b in s.logit_bias if not 0 <= i < vocab or not math.isfinite(b)), None)
        if bad is not None:
            raise InvalidArgument(f"{where}.sampling.logit_bias: id {bad} is outside the vocabulary [0, {vocab}) "
                                  "or its bias is not finite")
        if seq.allowed and (len(seq.allowed) % 4 or len(seq.allowed) > 4 * (vocab // 32 + 1)):
            raise InvalidArgument(f"{where}.allowed_tokens is {len(seq.allowed)} bytes: 32-bit words, at most one "
                                  f"bit per id of the vocabulary of {vocab}")
        if seq.allowed and not any(seq.allowed):
            raise InvalidArgument(f"{where}.allowed_tokens allows no token id")
        if seq.ids is not None:
            if len(seq.ids) != seq.count:
                raise InvalidArgument(f"{where}.token_ids holds {len(seq.ids)} ids for {seq.count} positions")
            if any(not 0 <= t < vocab for t in seq.ids):
                raise InvalidArgument(f"{where}.token_ids: an id is outside the vocabulary [0, {vocab})")
        if self.stage.is_last and s.needs_ids:
            if seq.ids is None:
                raise InvalidArgument(f"{where}.token_ids is empty: penalties and prompt log probabilities need "
                                      "the slice's ids")
            if seq.start and seq.session_id not in self.history and seq.fork_from not in self.history:
                raise InvalidArgument(f"{where}: penalties and prompt log probabilities need the session's ids "
                                      f"from position 0; this stage has none for {seq.session_id!r}")

    def _check_prefix(self, where: str, seq: Slice) -> None:
        if not self.stage.causal:
            raise InvalidArgument(f"{where}.prefix_blocks / prefix_tokens: an encoder keeps no cache")
        check_hashes(where, list(seq.prefix_blocks))
        blocks = self.pool.layout.blocks_for(seq.start + seq.count)
        if len(seq.prefix_blocks) > blocks:
            raise InvalidArgument(f"{where}.prefix_blocks names {len(seq.prefix_blocks)} blocks; the session "
                                  f"reaches {blocks} blocks with this slice")
        if seq.prefix_tokens and seq.prefix_tokens != seq.start:
            raise InvalidArgument(f"{where}.prefix_tokens is {seq.prefix_tokens}; it must equal start_position "
                                  f"({seq.start}): the positions before the slice come from the prefix store")

    def step(self, step: Step) -> StepResult:
        if self.closed:
            raise FailedPrecondition("no shard is loaded on this worker: it was unloaded")
        began = time.perf_counter()
        self._idle_until(began)
        try:
            return self._step(step)
        finally:
            self._idle_since = ended = time.perf_counter()
            self.metrics.busy_s += ended - began
            self.metrics.steps += 1
            self.metrics.tokens += sum(s.count for s in step.sequences)
            self.metrics.prefix_evictions = self.prefix.evictions
            if self.on_step is not None:
                self.on_step(ended - began)

    def _step(self, step: Step) -> StepResult:
        self._check_step(step)
        offsets = [0]
        for seq in step.sequences:
            offsets.append(offsets[-1] + seq.count)
        seen: set[str] = set()
        kept: list[int] = []
        caches: list[SessionCache] = []
        errors: list[tuple[str, ShardlineError]] = []
        try:
            for i, seq in enumerate(step.sequences):
                try:
                    if seq.session_id in seen:
                        raise InvalidArgument(f"sequences[{i}].session_id {seq.session_id!r} appears twice in "
                                              "one batch")
                    ids = step.token_ids[offsets[i]: offsets[i + 1]] if step.token_ids is not None else None
                    caches.append(self._check_sequence(i, seq, ids))
                except ShardlineError as exc:
                    errors.append((seq.session_id, exc))
                    continue
                seen.add(seq.session_id)
                kept.append(i)
        except BaseException:
            for c, i in zip(caches, kept, strict=True):  # reserved for this step, never registered
                if step.sequences[i].session_id not in self.sessions:
                    c.release()
            raise
        if not kept:
            return StepResult(errors=errors)
        sequences = [step.sequences[i] for i in kept]
        rows = (torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in kept]).to(self.stage.device)
                if errors else None)
        new = [c for seq, c in zip(sequences, caches, strict=True) if seq.session_id not in self.sessions]
        try:
            out = self._compute(step, sequences, caches, rows)
        except BaseException:
            for cache in new:  # never registered: give their blocks back
                cache.release()
            raise
        self.metrics.prefill_tokens += sum(s.count for s in sequences if s.count > 1 or s.start == 0)
        if self.stage.causal:
            now = time.monotonic()
            for seq, cache in zip(sequences, caches, strict=True):
                if seq.prefix_tokens and seq.session_id not in self.sessions:
                    self.metrics.prefix_reused += seq.prefix_tokens
                self.sessions[seq.session_id] = cache
                self.last_step[seq.session_id] = now
                if seq.prefix_blocks:
                    self.prefix.save(cache, list(seq.prefix_blocks), seq.start + seq.count)
                if self.stage.is_last and seq.sampling.needs_ids and seq.ids is not None:
                    if seq.fork_from and seq.session_id not in self.history:
                        self.history[seq.session_id] = self.history.get(seq.fork_from, [])[: seq.start]
                    self.history.setdefault(seq.session_id, [])[seq.start:] = seq.ids
        else:
            for cache in caches:
                cache.release()
        return self._result(step.output, sequences, out, errors, kept, step.send_on)

    def _compute(self, step: Step, sequences: list[Slice], caches: list[SessionCache],
                 rows: torch.Tensor | None) -> torch.Tensor:
        packing = Packing([s.start for s in sequences], [s.count for s in sequences])
        token_ids = hidden = None
        if step.token_ids is not None:
            token_ids = to_device(torch.tensor(step.token_ids, dtype=torch.long), self.stage.device)
            token_ids = token_ids[rows] if rows is not None else token_ids
        if step.hidden is not None:
            hidden = decode_hidden(step.hidden, step.hidden_scale, self.stage.dtype, self.stage.device)
            hidden = hidden[rows] if rows is not None else hidden
        return self.stage.forward(caches, packing, token_ids, hidden)

    def _result(self, output: str, sequences: list[Slice], out: torch.Tensor,
                errors: list[tuple[str, ShardlineError]], kept: list[int], send_on: bool = False) -> StepResult:
        if not self.stage.is_last or output == "hidden":
            if send_on and not self.stage.is_last:  # to the next stage: in this link's wire dtype
                hidden, scale = encode_hidden(out, self.wire_dtype)
                return StepResult(tensor=hidden, errors=errors, kept=kept, scale=scale)
            return StepResult(tensor=raw_from_torch(out), errors=errors, kept=kept)
        if output == "logits":
            return StepResult(tensor=raw_from_torch(self.stage.logits(out)), errors=errors, kept=kept)
        last_rows = (torch.tensor([s.count for s in sequences]).cumsum(0) - 1).to(out.device)
        logits = self.stage.logits(out[last_rows])
        if output == "last_logits":
            return StepResult(tensor=raw_from_torch(logits), errors=errors, kept=kept)
        positions = [s.start + s.count for s in sequences]
        params = [s.sampling for s in sequences]
        adjusted, finite = logits, None
        if any(changes_logits(p) or seq.allowed for p, seq in zip(params, sequences, strict=True)):
            adjusted = torch.stack([adjust(row, p, self.history.get(seq.session_id, ()), seq.allowed)
                                    if changes_logits(p) or seq.allowed else row.float()
                                    for row, p, seq in zip(logits, params, sequences, strict=True)])
            finite = torch.isfinite(logits).all(dim=-1).tolist()  # the model's own: a mask's -inf is no fault
        sampled = sample(adjusted, params, positions, finite)
        asked = any(p.logprobs is not None or p.prompt_logprobs is not None for p in params)
        tokens: list[int] = []
        still: list[int] = []
        scored: list[SequenceScores] = []
        for j, (i, seq, token) in enumerate(zip(kept, sequences, sampled, strict=True)):
            if isinstance(token, ShardlineError):  # this sequence's sampling failed: its neighbours go on
                errors.append((seq.session_id, token))
                self.prompts.forget(seq.session_id)
                continue
            tokens.append(token)
            still.append(i)
            if asked:
                scored.append(self._scores(seq, token, logits[j], out, int(last_rows[j]) - seq.count + 1))
        return StepResult(token_ids=tokens, errors=errors, kept=still, scores=scored if asked else None)

    def _scores(self, seq: Slice, token: int, logits: torch.Tensor, out: torch.Tensor, row: int) -> SequenceScores:
        """A sequence's log probabilities: of its sampled id (from its last row's logits), and of the prompt
        ids in this slice (its rows of `out`, from `row`)."""
        s = seq.sampling
        sampled: TokenScore | None = None
        if s.logprobs is not None:
            row_logprobs = torch.log_softmax(logits.float(), dim=-1).unsqueeze(0)
            sampled = scores(row_logprobs, [seq.start + seq.count], [token], s.logprobs)[0]
        prompt: list[TokenScore] = []
        if s.prompt_logprobs is not None and seq.ids is not None and seq.start < s.prompt_tokens:
            prompt = self.prompts.score(seq.session_id, seq.start, seq.ids, s,
                                        lambda first, upto: self.stage.logits(out[row + first: row + upto]))
        return SequenceScores(sampled, tuple(prompt))


T = TypeVar("T")


class ComputeThread:
    """The worker's single compute thread: steps run one at a time, in the order they were submitted."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        # the intended torch thread count and (CUDA) the worker's device on the thread (device.init_thread)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute",
                                                           initializer=init_thread, initargs=(device,))

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
