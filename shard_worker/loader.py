"""Fetch a shard's tensors and build its stage: the whole of LoadShard's work, on a loader thread."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shard_worker.engine import apply_engine
from shard_worker.quantize import held_bytes
from shard_worker.runtime import TORCH_DTYPES
from shard_worker.stage import Stage, build_stage
from shard_worker.weights import Progress, ShardSpec, fetch_shard


def load_stage(spec: ShardSpec, report: Callable[[Progress], None]) -> tuple[Stage, int, str]:
    """The stage built from the fetched weights, the bytes it holds, and the model's weights digest."""
    fetched = fetch_shard(spec, report)
    report(Progress("building", fetched.nbytes, fetched.nbytes, len(fetched.tensors), len(fetched.tensors)))
    device = torch.device(spec.device)
    stage = build_stage(fetched.family, fetched.config, spec.start, spec.end, fetched.tensors,
                        TORCH_DTYPES[spec.dtype], spec.quantize, device)
    stage.modules.layers = apply_engine(spec.engine, stage.modules.layers, stage.dtype, device)
    if spec.quantize:  # the bytes held now (int8 weights and their scales), not those fetched
        fetched.tensors.clear()
        return stage, held_bytes(stage.modules), fetched.digest
    return stage, fetched.nbytes, fetched.digest
