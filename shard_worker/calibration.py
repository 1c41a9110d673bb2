"""Calibration: what one layer of a model costs on this worker, before any weight arrives. One layer is built
from the model's config with random weights (through the same build as a real stage) and timed on a step of
the planned shape: `sequences` sequences of `tokens` tokens each, over `context` positions already cached.
The result is the fastest of a few repeats after a warm-up, within a time bound (other work on the machine
only ever adds time: the fastest run is the best estimate of this worker's own speed; a median followed
another process's bursts); it runs on the compute thread (the shard lifecycle submits it there)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from shard_worker.families import FAMILIES, Family
from shard_worker.kv_cache import KVPool
from shard_worker.stage import Packing, Stage, build_stage
from shardline.codec import itemsize
from shardline.errors import InvalidArgument

MAX_SEQUENCES = 1024
MAX_STEP_TOKENS = 65_536
MAX_CONTEXT = 131_072
MAX_CONFIG_CHARS = 1_000_000
DEFAULT_MAX_S, MOST_S = 10.0, 60.0
REPEATS = 11


@dataclass(frozen=True)
class CalibrationSpec:
    family: str
    config_json: str
    dtype: str
    sequences: int
    tokens: int
    context: int
    max_s: float = DEFAULT_MAX_S


@dataclass(frozen=True)
class Calibrated:
    seconds_per_layer: float
    repeats: int
    activation_bytes_per_token: int
    threads: int


def check(spec: CalibrationSpec, memory_budget_bytes: int) -> tuple[Family, Any]:
    """The family and config of a calibration, every field checked (InvalidArgument names what is wrong)."""
    family = FAMILIES.get(spec.family)
    if family is None:
        raise InvalidArgument(f"family {spec.family[:64]!r} is not one this worker runs ({', '.join(FAMILIES)})")
    if len(spec.config_json) > MAX_CONFIG_CHARS:
        raise InvalidArgument(f"config_json has {len(spec.config_json)} characters; at most {MAX_CONFIG_CHARS}")
    try:
        fields = json.loads(spec.config_json)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        config = family.config_class()(**fields)
        layers, hidden = family.num_layers(config), int(config.hidden_size)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidArgument(f"config_json is not a {family.name} config: {str(exc)[:200]}") from None
    if layers < 1 or hidden < 1:
        raise InvalidArgument(f"config_json: {layers} layers of hidden size {hidden}; need at least 1 of each")
    if not 1 <= spec.sequences <= MAX_SEQUENCES:
        raise InvalidArgument(f"sequences must be 1 .. {MAX_SEQUENCES}, got {spec.sequences}")
    if spec.tokens < 1 or spec.sequences * spec.tokens > MAX_STEP_TOKENS:
        raise InvalidArgument(f"tokens must be >= 1 with sequences * tokens <= {MAX_STEP_TOKENS}, got "
                              f"{spec.sequences} x {spec.tokens}")
    if not 0 <= spec.context <= MAX_CONTEXT:
        raise InvalidArgument(f"context_tokens must be 0 .. {MAX_CONTEXT}, got {spec.context}")
    if not 0 < spec.max_s <= MOST_S:
        raise InvalidArgument(f"max_ms must be 1 .. {int(MOST_S * 1000)} (0 = {int(DEFAULT_MAX_S * 1000)})")
    weights, kv = _layer_bytes(family, config, spec.dtype), _kv_bytes(family, config, spec)
    activations = _activation_bytes(config, spec)
    need = weights + kv + activations
    if need > memory_budget_bytes:
        raise InvalidArgument(f"one layer of this config with its step needs {need / 2**20:.0f} MiB (weights "
                              f"{weights / 2**20:.0f} MiB, KV {kv / 2**20:.0f} MiB, activations "
                              f"{activations / 2**20:.0f} MiB); this worker offers "
                              f"{memory_budget_bytes / 2**20:.0f} MiB")
    return family, config


def _middle(family: Family, config: Any) -> int:
    """The layer timed: one in the middle (neither embedding nor head, where the model has 3 layers or more)."""
    return family.num_layers(config) // 2


def _layer_bytes(family: Family, config: Any, dtype: str) -> int:
    i = _middle(family, config)
    size = itemsize(dtype)
    return int(sum(p.numel() for p in family.build(config, i, i + 1).state_dict().values())) * size


def _kv_bytes(family: Family, config: Any, spec: CalibrationSpec) -> int:
    if not family.causal:
        return 0
    heads, head_dim = family.kv_shape(config)
    size = itemsize(spec.dtype)
    return 2 * spec.sequences * (spec.context + spec.tokens) * heads * head_dim * size


def _activation_bytes(config: Any, spec: CalibrationSpec) -> int:
    """The step's working memory: rows x (intermediate + hidden) in the dtype, and the attention scores
    (sequences x heads x tokens x (context + tokens), float32)."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1)
    size = itemsize(spec.dtype)
    rows = spec.sequences * spec.tokens
    scores = spec.sequences * heads * spec.tokens * (spec.context + spec.tokens) * 4
    return rows * (intermediate + hidden) * size + scores


def _random_stage(family: Family, config: Any, dtype: torch.dtype, device: torch.device) -> Stage:
    """One layer with random weights (normal(0, 0.02) matrices, ones elsewhere: no denormals to slow it)."""
    i = _middle(family, config)
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in family.build(config, i, i + 1).state_dict(keep_vars=True).items():
        if meta.is_floating_point() and meta.dim() >= 2:
            t = torch.empty(meta.shape, dtype=dtype).normal_(0, 0.02, generator=generator)
        elif meta.is_floating_point():
            t = torch.ones(meta.shape, dtype=dtype)
        else:
            t = torch.zeros(meta.shape, dtype=meta.dtype)
        tensors[family.checkpoint_name(name)] = t
    return build_stage(family, config, i, i + 1, tensors, dtype, device=device)


def calibrate(spec: CalibrationSpec, family: Family, config: Any,
              device: torch.device = torch.device("cpu")) -> Calibrated:
    """Seconds per layer of the planned step (the fastest of up to REPEATS after a warm-up, within spec.max_s)."""
    deadline = time.monotonic() + spec.max_s
    dtype = getattr(torch, spec.dtype)
    stage = _random_stage(family, config, dtype, device)
    pool = KVPool(stage.kv_layout(16), blocks_total=1 << 40)
    sessions = [stage.new_session(pool) for _ in range(spec.sequences)]
    if stage.causal:
        for s in sessions:
            s.reserve(spec.context + spec.tokens)
            for k in (*s.keys, *s.values):
                k.normal_()
    context = spec.context if stage.causal else 0
    packing = Packing([context] * spec.sequences, [spec.tokens] * spec.sequences)
    rows = spec.sequences * spec.tokens
    ids = torch.zeros(rows, dtype=torch.long, device=device) if stage.is_first else None
    hidden = None if stage.is_first else torch.randn(rows, stage.hidden_size, dtype=dtype, device=device)
    times: list[float] = []
    for attempt in range(REPEATS + 1):
        for s in sessions:
            s.length = context
        began = time.perf_counter()
        stage.forward(sessions, packing, ids, hidden)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:  # the first is the warm-up
            times.append(time.perf_counter() - began)
        if time.monotonic() > deadline:
            break
    for s in sessions:
        s.release()
    if not times:  # the warm-up alone took the whole bound: it is the measurement
        times.append(time.perf_counter() - began)
    size = dtype.itemsize
    return Calibrated(min(times), len(times), stage.hidden_size * size, torch.get_num_threads())
