"""A shard worker's shard from LoadShard to UnloadShard: what it holds, its state, when it serves, and the
threads its work runs on (one compute thread; weight loading on a loader thread). Domain types only."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shard_worker import calibration
from shard_worker.allocator import heap_while_loading, trim
from shard_worker.capacity import plan_runtime
from shard_worker.device import DeviceError, DeviceSettings, check_dtype, init_thread
from shard_worker.library_failure import describe_library_failure
from shard_worker.loader import load_stage
from shard_worker.metrics import WorkerMetrics
from shard_worker.runtime import ComputeThread, KVSettings, StageRuntime
from shard_worker.weights import Progress, ShardSpec
from shardline.errors import FailedPrecondition, Internal, InvalidArgument, ShardlineError, status_of
from shardline.limits import default_memory_budget
from shardline.v1 import coordinator_pb2

log = logging.getLogger(__name__)


@dataclass
class Shard:
    spec: ShardSpec
    runtime: StageRuntime
    weight_bytes: int
    digest: str = ""  # the model's weights (shardline/weights_digest.py), as GetStatus reports it


class ShardLifecycle:
    """At most one shard held: loaded, replaced, unloaded; `state` is empty, loading, ready or failed, and
    the worker serves (`set_serving`) only while one is ready. Sessions left without EndSession expire."""

    def __init__(self, set_serving: Callable[[bool], Awaitable[None]], device: DeviceSettings | None = None,
                 memory_budget_bytes: int = 0) -> None:
        self._set_serving = set_serving
        self.device = device or DeviceSettings()  # --device, --dtype, --engine (shard_worker/device.py)
        self.memory_budget_bytes = memory_budget_bytes or default_memory_budget()
        self.compute = ComputeThread(self.device.device)
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader",
                                                             initializer=init_thread, initargs=(self.device.device,))
        self.state = "empty"
        self.shard: Shard | None = None
        self.last_error = ""
        self._loading = False
        self.loads = 0  # loads that fetched weights (GetStatusResponse.loads)
        self._sweeper = asyncio.create_task(self._expire_sessions())
        self.metrics = WorkerMetrics(self)  # served over HTTP when the worker is given a metrics port

    async def load(self, spec: ShardSpec, settings: KVSettings, wire_dtype: str) -> AsyncGenerator[Progress, None]:
        """Load `spec` in place of what is held, reporting its progress, "ready" last. A failure, or the
        caller going away, leaves the worker failed and holding nothing."""
        if self._loading:
            raise FailedPrecondition("a LoadShard is already in progress on this worker")
        self._loading = True
        if self.shard is not None:  # replaced: what it did stays counted
            self.metrics.retire(self.shard.runtime.metrics)
        self.state, self.shard, self.last_error = "loading", None, ""
        await self._set_serving(False)
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[Progress] = asyncio.Queue()

        def report(p: Progress) -> None:
            loop.call_soon_threadsafe(progress.put_nowait, p)

        # a loader thread of its own: a load waits on the parameter service, which may share this process's
        # default executor (in tests, a local cluster) and must never starve behind the loads it serves
        task: asyncio.Future[tuple[StageRuntime, int, str]] = loop.run_in_executor(
            self._loader, functools.partial(_loaded_runtime, spec, settings, wire_dtype, self.memory_budget_bytes,
                                            report))
        try:
            while not task.done() or not progress.empty():
                getter = asyncio.ensure_future(progress.get())
                pending: list[asyncio.Future[Any]] = [getter, task]
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            runtime, weight_bytes, digest = task.result()
            runtime.on_step = self.metrics.step_seconds.observe
            self.shard = Shard(spec, runtime, weight_bytes, digest)
            self.loads += 1
            self.state = "ready"
            await self._set_serving(True)
            log.info("loaded %s layers [%d, %d): %d bytes", spec.model, spec.start, spec.end, weight_bytes)
            yield Progress("ready", bytes_done=weight_bytes, bytes_total=weight_bytes)
        except BaseException as exc:
            self.state, self.shard = "failed", None
            self.last_error = status_of(exc)[1] if isinstance(exc, Exception) else "load cancelled"
            log.error("LoadShard %s [%d, %d) failed: %s", spec.model, spec.start, spec.end, self.last_error)
            raise
        finally:
            if task.done():
                self._loading = False
            else:  # the caller went away mid-load: the loader thread runs on, and no other load may start
                task.add_done_callback(lambda _: setattr(self, "_loading", False))

    def runtime(self) -> StageRuntime:
        """The held shard's runtime; FAILED_PRECONDITION when none is held."""
        if self.shard is None:
            raise FailedPrecondition(f"no shard is loaded on this worker (state: {self.state})")
        return self.shard.runtime

    async def unload(self, model: str, dropped: Callable[[], None]) -> tuple[int, int] | None:
        """Free the held shard (of `model`, when named): (weight bytes freed, sessions ended), or None when
        nothing is held. `dropped` runs the moment no new step can reach it, before anything is awaited."""
        if self._loading:
            raise FailedPrecondition("a LoadShard is in progress on this worker: unload once it has ended")
        shard = self.shard
        if shard is None:  # nothing held: unloading twice is harmless
            return None
        spec, runtime, weight_bytes = shard.spec, shard.runtime, shard.weight_bytes
        if model and model != spec.model:
            raise FailedPrecondition(f"this worker holds model {spec.model!r} (layers [{spec.start}, {spec.end})), "
                                     f"not {model[:128]!r}: nothing was unloaded")
        del shard
        self.metrics.retire(runtime.metrics)  # what it did stays counted
        self.shard, self.state, self.last_error = None, "empty", ""
        dropped()
        await self._set_serving(False)
        # on the compute thread, after the steps already queued there (they finish on the old runtime)
        ended = await asyncio.wrap_future(self.compute.submit(runtime.close))
        del runtime
        await asyncio.to_thread(release_memory)
        log.info("unloaded %s layers [%d, %d): %d weight bytes, %d sessions ended", spec.model, spec.start,
                 spec.end, weight_bytes, ended)
        return weight_bytes, ended

    async def calibrate(self, spec: calibration.CalibrationSpec) -> calibration.Calibrated:
        """Time `spec`'s layer on the compute thread (its checks too: a dtype probe, a config of up to 1M
        characters), never the event loop; bounded by max_ms. Only a worker holding no shard calibrates."""
        if self.shard is not None:  # its steps would wait behind the timing, and its memory is in use
            s = self.shard.spec
            raise FailedPrecondition(f"this worker serves {s.model} layers [{s.start}, {s.end}): only a worker "
                                     f"holding no shard calibrates (timing would stall its steps)")
        device, budget = self.device.device, self.memory_budget_bytes

        def checked_and_timed() -> calibration.Calibrated:
            try:
                check_dtype(device, spec.dtype, "dtype")
            except DeviceError as exc:
                raise InvalidArgument(str(exc)) from None
            family, config = calibration.check(spec, budget)  # parses the config and builds it on meta
            return calibration.calibrate(spec, family, config, device)

        done = await asyncio.wait_for(asyncio.wrap_future(self.compute.submit(checked_and_timed)),
                                      timeout=spec.max_s * 2 + 30)
        log.info("calibrated %s at %s, %d x %d tokens: %.2f ms per layer (%d threads)", spec.family, spec.dtype,
                 spec.sequences, spec.tokens, done.seconds_per_layer * 1000, done.threads)
        return done

    def held(self) -> coordinator_pb2.HeldShard | None:
        """The shard held and ready, as a registration tells it (None: none)."""
        shard = self.shard
        if shard is None or self.state != "ready":
            return None
        return coordinator_pb2.HeldShard(model=shard.spec.model, start_layer=shard.spec.start,
                                         end_layer=shard.spec.end, weights_digest=shard.digest)

    async def end_all_sessions(self) -> int:
        """End every session the held shard keeps (a coordinator that forgot this worker created them: they are
        orphans); how many."""
        if self.shard is None:
            return 0
        runtime = self.shard.runtime
        return await asyncio.wrap_future(self.compute.submit(lambda: runtime.end_sessions(list(runtime.sessions))))

    async def end_sessions(self, ids: list[str]) -> int:
        """How many of these sessions the held shard ended (on the compute thread); 0 when none is held."""
        if self.shard is None:
            return 0
        runtime = self.shard.runtime
        return await asyncio.wrap_future(self.compute.submit(lambda: runtime.end_sessions(ids)))

    async def _expire_sessions(self) -> None:
        """Supervised: sessions abandoned without EndSession are freed once their TTL has passed."""
        while True:
            # no reference to the shard across the sleep: an UnloadShard meanwhile frees it at once
            await asyncio.sleep(self._sweep_interval())
            await self._sweep()

    def _sweep_interval(self) -> float:
        shard = self.shard
        return max(0.05, min(5.0, shard.runtime.settings.session_ttl_s / 4) if shard is not None else 5.0)

    async def _sweep(self) -> None:
        shard = self.shard
        if shard is None:
            return
        try:
            freed = await asyncio.wrap_future(self.compute.submit(shard.runtime.expire))
            if freed:
                log.info("freed %d sessions idle for more than %.0f s", freed, shard.runtime.settings.session_ttl_s)
        except Exception:  # noqa: BLE001 - logged; the sweep goes on
            log.exception("expiring idle sessions failed once")

    async def close(self) -> None:
        if self.metrics.server is not None:
            await self.metrics.server.close()
        self._sweeper.cancel()
        self.compute.shutdown()
        self._loader.shutdown(wait=False, cancel_futures=True)


def _loaded_runtime(spec: ShardSpec, settings: KVSettings, wire_dtype: str, budget: int,
                    report: Callable[[Progress], None]) -> tuple[StageRuntime, int, str]:
    """On the loader thread: the shard's weights fetched and its runtime planned within `budget` bytes."""
    try:
        with heap_while_loading():  # then the step headroom is measured as steps will run (allocator.py)
            stage, weight_bytes, digest = load_stage(spec, report)
        runtime = plan_runtime(stage, weight_bytes, budget, settings)
    except Exception as exc:
        inside = None if isinstance(exc, ShardlineError) else describe_library_failure(exc)
        if inside is None:
            raise
        log.error("LoadShard %s [%d, %d) failed inside a library", spec.model, spec.start, spec.end, exc_info=exc)
        raise Internal(f"loading {spec.model} layers [{spec.start}, {spec.end}) failed inside {inside}") from exc
    runtime.wire_dtype = wire_dtype
    return runtime, weight_bytes, digest


def release_memory() -> None:
    """Collect what an unload left unreachable and hand the freed heap back to the OS, so the process's RSS
    drops (glibc keeps freed pages of its arenas otherwise; elsewhere only the collection runs)."""
    gc.collect()
    trim()
