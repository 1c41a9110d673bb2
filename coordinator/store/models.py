"""The model store: one directory per model with config.json, tokenizer files, safetensors shards and a
manifest.json that lists every tensor (name, dtype, shape, size, sha256, layer, file, byte offset).

A store directory is also a valid Hugging Face model directory, so `transformers` can load it whole (the
reference oracle in tests).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from shardline.errors import NotFound
from shardline.weights_digest import weights_digest

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_store() -> Path:
    """The per-user cache directory (SHARDLINE_STORE overrides it when set)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("SHARDLINE_STORE") or Path(user_cache_dir("shardline")) / "models")


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r} must be 1-128 of letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


class ModelTask(StrEnum):
    """What a model does: encoders (the bert family) embed text, every other family generates it."""

    GENERATE = "generate"
    EMBED = "embed"


ENCODER_FAMILIES = frozenset({"bert"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str             # safetensors name: F32, F16, BF16, ...
    shape: list[int]
    size_bytes: int
    sha256: str
    part: str              # "embed" | "layer" | "head"
    layer: int             # -1 unless part == "layer"
    file: str              # safetensors file, relative to the model directory
    offset_bytes: int      # where the tensor's bytes start in that file


@dataclass(frozen=True)
class Manifest:
    name: str
    family: str
    num_layers: int
    tensors: list[TensorInfo]
    head_shares: list[str] = field(default_factory=list)  # embedding tensors the head also loads (tied)
    format: int = FORMAT_VERSION

    @property
    def task(self) -> ModelTask:
        return ModelTask.EMBED if self.family in ENCODER_FAMILIES else ModelTask.GENERATE

    @property
    def total_size_bytes(self) -> int:
        return sum(t.size_bytes for t in self.tensors)

    @functools.cached_property
    def digest(self) -> str:
        """The weights' digest, as a worker holding a shard of them reports it (GetStatusResponse.weights_digest)."""
        return weights_digest((t.name, t.sha256) for t in self.tensors)

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data: dict[str, Any] = json.loads(text)
        tensors = [TensorInfo(**t) for t in data.pop("tensors")]
        return cls(tensors=tensors, **data)


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def has(self, name: str) -> bool:
        return bool(_NAME.match(name)) and (self.path(name) / MANIFEST).is_file()

    def manifest(self, name: str) -> Manifest:
        if not self.has(name):
            raise NotFound(f"model {name!r} is not in the store {self.root} (models: {self.models() or 'none'})")
        return Manifest.from_json((self.path(name) / MANIFEST).read_text())

    def config_json(self, name: str) -> str:
        return (self.path(name) / "config.json").read_text()
