"""The coordinator's configuration: one typed object, built by the CLI (nothing reads the environment at
import time)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from coordinator.store import default_store


class CoordinatorConfig(BaseModel):
    """Every field can come from a TOML file (`coordinator serve --config FILE`) or from flags."""

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    store: Path = Field(default_factory=default_store)
    model: str = "smollm2"
    workers: int = Field(3, ge=1, description="deploy once this many workers have registered")
    advertise: str = Field("", description="host workers reach this machine on (default: host)")
    parameters_address: str = Field("", description="host:port of a parameter service; empty = in-process")
    parameters_port: int = Field(0, ge=0, le=65535, description="port of the in-process parameter service")
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$")
    max_tokens_limit: int = Field(2048, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_active_streams: int = Field(64, ge=1, description="streams batched together at most")
    max_queued_streams: int = Field(256, ge=0, description="streams waiting to join; more are refused")
    prefill_chunk_tokens: int = Field(256, ge=1, description="prompt tokens fed per step")
    micro_batch_groups: int = Field(0, ge=0, description="micro-batch groups in flight; 0 = one per stage")
    max_infer_batch: int = Field(1024, ge=1, description="inputs one Infer may carry")
    infer_micro_batch: int = Field(32, ge=1, description="inputs per micro-batch of an Infer")
    heartbeat_interval_ms: int = Field(2000, ge=100)
    heartbeat_timeout_ms: int = Field(10000, ge=500)
    step_timeout_ms: int = Field(60_000, ge=100, description="a step not answered within this heals the chain")
    keepalive_time_ms: int = Field(20_000, ge=1000, description="ping idle connections this often")
    keepalive_timeout_ms: int = Field(10_000, ge=100, description="a ping unanswered this long closes the link")
    probe_timeout_ms: int = Field(2000, ge=100, description="a worker that does not answer a probe within this "
                                  "is taken for dead during recovery")
    load_timeout_s: float = Field(600, gt=0, description="deadline of one LoadShard")
    rebalance_on_join: bool = Field(False, description="fold a joining spare into a chain narrower than `workers`")
    drain_seconds: float = Field(30, ge=0, description="on SIGTERM, how long streams in flight may finish")


def load_config(path: Path, **overrides: object) -> CoordinatorConfig:
    """A config from a TOML file; `overrides` (flags given on the command line) win."""
    import tomllib

    try:
        fields = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return CoordinatorConfig(**{**fields, **overrides})
