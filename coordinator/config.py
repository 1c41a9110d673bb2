"""The coordinator's configuration: one typed object, built by the CLI (nothing reads the environment at
import time)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class CoordinatorConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    store: Path
    model: str = "smollm2"
    workers: int = Field(3, ge=1, description="deploy once this many workers have registered")
    parameters_address: str = Field("", description="host:port of a parameter service; empty = in-process")
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$")
    max_tokens_limit: int = Field(2048, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    heartbeat_interval_ms: int = Field(2000, ge=100)
    heartbeat_timeout_ms: int = Field(10000, ge=500)
