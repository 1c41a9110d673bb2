"""GPT-2: learned absolute positions, Conv1D projections, tied head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import shardline.families
from shard_worker.families.base import Family, StageModules
from shard_worker.kv_cache import ATTENTION
from shard_worker.transformers_adapter import GPT2Block, GPT2Config, call_layer, use_attention


class GPT2(Family):
    names = shardline.families.GPT2
    prefixes = {"embed.wte": "transformer.wte", "embed.wpe": "transformer.wpe", "layers": "transformer.h",
                "norm": "transformer.ln_f", "head": "lm_head"}
    quantizations = frozenset({"int8"})

    def config_class(self) -> Any:
        return GPT2Config

    def build(self, config: Any, start: int, end: int) -> StageModules:
        use_attention(config, ATTENTION)  # each session's KV read in place
        mods = StageModules()
        with torch.device("meta"):
            if start == 0:
                mods.embed = _GPT2Embedding(config)
            for i in range(start, end):
                mods.layers[str(i)] = GPT2Block(config, layer_idx=i)
            if end == config.n_layer:
                mods.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
                mods.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        return mods

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor | None, cache: Any, rope: Any) -> Any:
        return call_layer(layer, hidden, cache, attention_mask=mask)


class _GPT2Embedding(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte(token_ids) + self.wpe(positions)  # type: ignore[no-any-return]
