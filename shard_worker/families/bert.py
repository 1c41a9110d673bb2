"""BERT-style encoders (all-MiniLM-L6-v2 and friends): bidirectional attention, no KV cache; the last stage
returns the final hidden states, which the coordinator pools into sentence embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import shardline.families
from shard_worker.families.base import Family, StageModules
from shard_worker.transformers_adapter import BertConfig, BertLayer, call_layer, use_attention


class Bert(Family):
    names = shardline.families.BERT
    prefixes = {"embed": "embeddings", "layers": "encoder.layer"}
    causal = False

    def config_class(self) -> Any:
        return BertConfig

    def build(self, config: Any, start: int, end: int) -> StageModules:
        use_attention(config, "sdpa")
        mods = StageModules()
        with torch.device("meta"):
            if start == 0:
                mods.embed = _BertEmbedding(config)
            for i in range(start, end):
                mods.layers[str(i)] = BertLayer(config, layer_idx=i)
        return mods

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor | None, cache: Any, rope: Any) -> Any:
        return call_layer(layer, hidden, attention_mask=mask)


class _BertEmbedding(nn.Module):
    """Word + position + token type (all 0: one segment) embeddings, then LayerNorm; checkpoint names."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        types = self.token_type_embeddings.weight[0]
        return self.LayerNorm(self.word_embeddings(token_ids) + self.position_embeddings(positions) + types)  # type: ignore[no-any-return]
