"""What every family adapter provides. Stages keep Hugging Face tensor names, so a subset of a checkpoint's
state dict loads straight into a stage with `load_state_dict(assign=True)`."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Placement:
    """Where a tensor belongs: the embedding (first stage), a layer, or the head (last stage)."""

    part: str  # "embed" | "layer" | "head"
    layer: int = -1


class StageModules(nn.Module):
    """The modules of one stage, named as in the Hugging Face model so checkpoints load by name.

    `layers` maps the global layer index (as a string) to the decoder layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed: nn.Module | None = None
        self.layers = nn.ModuleDict()
        self.norm: nn.Module | None = None
        self.head: nn.Module | None = None
        self.rotary: nn.Module | None = None


class Family(ABC):
    name: str
    model_types: tuple[str, ...]
    layer_pattern: re.Pattern[str]
    embed_names: tuple[str, ...]
    head_names: tuple[str, ...]
    # name of the head weight -> the embedding weight it is tied to, when config.tie_word_embeddings
    tied: dict[str, str]

    def placement(self, tensor_name: str) -> Placement:
        match = self.layer_pattern.match(tensor_name)
        if match:
            return Placement("layer", int(match.group(1)))
        if tensor_name in self.embed_names:
            return Placement("embed")
        if tensor_name in self.head_names:
            return Placement("head")
        raise ValueError(f"tensor {tensor_name!r} is not part of a {self.name} model")

    def is_tied(self, config: Any) -> bool:
        return bool(getattr(config, "tie_word_embeddings", False))

    @abstractmethod
    def config_class(self) -> Any: ...

    @abstractmethod
    def num_layers(self, config: Any) -> int: ...

    @abstractmethod
    def build(self, config: Any, start: int, end: int) -> StageModules:
        """Modules for layers [start, end) (+ embedding when start == 0, + head when end == num_layers),
        created on the meta device except small computed buffers."""

    @abstractmethod
    def checkpoint_name(self, stage_name: str) -> str:
        """The checkpoint (Hugging Face) name of a stage parameter."""

    def load(self, config: Any, modules: StageModules, tensors: dict[str, torch.Tensor]) -> None:
        """Fill a meta-device stage with its own tensors, by name, without copying them."""
        state: dict[str, torch.Tensor] = {}
        for stage_name in modules.state_dict(keep_vars=True):
            name = self.checkpoint_name(stage_name)
            if name not in tensors and self.is_tied(config):
                name = self.tied.get(name, name)
            if name not in tensors:
                raise ValueError(f"tensor {name!r} is missing from the shard")
            state[stage_name] = tensors[name]
        modules.load_state_dict(state, strict=True, assign=True)

    @abstractmethod
    def embed(self, modules: StageModules, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                  mask: torch.Tensor | None, cache: Any, rope: Any) -> torch.Tensor: ...

    def rope(self, modules: StageModules, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        """Per-forward positional tensors shared by every layer (rotary cos/sin); None if unused."""
        return None

    def kv_shape(self, config: Any) -> tuple[int, int]:
        """(key/value heads, head dim) of the attention cache."""
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return kv_heads, head_dim

    def head_tensor_names(self, config: Any) -> tuple[str, ...]:
        """Names the last stage loads: the head's own, or the embedding it is tied to."""
        if self.is_tied(config):
            return tuple(self.tied.get(n, n) for n in self.head_names)
        return self.head_names

    def stage_tensor_names(self, config: Any, names: list[str], start: int, end: int) -> list[str]:
        """Of a checkpoint's tensor names, those a stage hosting [start, end) loads."""
        last = end == self.num_layers(config)
        wanted: list[str] = []
        for name in names:
            place = self.placement(name)
            if (place.part == "layer" and start <= place.layer < end) or (place.part == "embed" and start == 0):
                wanted.append(name)
        if last:
            for name in self.head_tensor_names(config):
                if name not in wanted:
                    wanted.append(name)
        return wanted
