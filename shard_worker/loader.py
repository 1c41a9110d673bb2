"""Fetch a shard's tensors and build its stage: the whole of LoadShard's work, on a loader thread."""

from __future__ import annotations

from collections.abc import Callable

from shard_worker.runtime import TORCH_DTYPES
from shard_worker.stage import Stage, build_stage
from shard_worker.weights import Progress, ShardSpec, fetch_shard


def load_stage(spec: ShardSpec, report: Callable[[Progress], None]) -> tuple[Stage, int]:
    fetched = fetch_shard(spec, report)
    report(Progress("building", fetched.nbytes, fetched.nbytes, len(fetched.tensors), len(fetched.tensors)))
    stage = build_stage(fetched.family, fetched.config, spec.start, spec.end, fetched.tensors,
                        TORCH_DTYPES[spec.dtype])
    return stage, fetched.nbytes
