"""What every family adapter provides on top of its naming (shardline.families): building a stage and
running its layers. Stages keep checkpoint tensor names through `checkpoint_name`, so a subset of a
checkpoint's state dict loads straight into a stage with `load_state_dict(assign=True)`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from shardline.families import FamilyNames


class StageModules(nn.Module):
    """The modules of one stage. `layers` maps the global layer index (as a string) to the decoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed: nn.Module | None = None
        self.layers = nn.ModuleDict()
        self.norm: nn.Module | None = None
        self.head: nn.Module | None = None
        self.rotary: nn.Module | None = None


class Family(ABC):
    names: FamilyNames
    # stage module prefix -> checkpoint prefix, e.g. "layers" -> "model.layers"
    prefixes: dict[str, str]
    # decoders attend causally and keep a KV cache per session; encoders see the whole sequence, keep nothing
    causal: bool = True
    # weight quantizations offered at load (shard_worker/quantize.py): only where their accuracy is measured
    quantizations: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.names.name

    def num_layers(self, config: Any) -> int:
        return self.names.num_layers(config)

    @abstractmethod
    def config_class(self) -> Any: ...

    @abstractmethod
    def build(self, config: Any, start: int, end: int) -> StageModules:
        """Modules for layers [start, end) (+ embedding when start == 0, + head when end == num_layers),
        created on the meta device except small computed buffers."""

    def checkpoint_name(self, stage_name: str) -> str:
        """The checkpoint (Hugging Face) name of a stage parameter."""
        for stage_prefix, checkpoint_prefix in self.prefixes.items():
            if stage_name.startswith(stage_prefix + "."):
                return checkpoint_prefix + stage_name[len(stage_prefix):]
        raise ValueError(f"stage parameter {stage_name!r} has no checkpoint name in family {self.name}")

    def load(self, config: Any, modules: StageModules, tensors: dict[str, torch.Tensor]) -> None:
        """Fill a meta-device stage with its own tensors, by name, without copying them."""
        state: dict[str, torch.Tensor] = {}
        for stage_name in modules.state_dict(keep_vars=True):
            name = self.checkpoint_name(stage_name)
            if name not in tensors and self.names.is_tied(config):
                name = self.names.tied.get(name, name)
            if name not in tensors:
                raise ValueError(f"tensor {name!r} is missing from the shard")
            state[stage_name] = tensors[name]
        modules.load_state_dict(state, strict=True, assign=True)

    def embed(self, modules: StageModules, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first stage's input embedding (families whose embedding ignores positions override this)."""
        if modules.embed is None:
            raise RuntimeError("this stage has no embedding")
        return modules.embed(token_ids, positions)  # type: ignore[no-any-return]

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                  mask: torch.Tensor | None, cache: Any, rope: Any) -> torch.Tensor:
        return self.call_layer(layer, hidden, positions, mask, cache, rope)  # type: ignore[no-any-return]

    @abstractmethod
    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor | None, cache: Any, rope: Any) -> Any:
        """Call one Hugging Face layer with the arguments its family takes, through the adapter's
        `call_layer` (which returns the hidden states, a tuple's first element where the layer returns one)."""

    def rope(self, modules: StageModules, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        """Per-forward positional tensors shared by every layer (rotary cos/sin); None if unused."""
        return None

    def kv_shape(self, config: Any) -> tuple[int, int]:
        """(key/value heads, head dim) of the attention cache."""
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return kv_heads, head_dim
