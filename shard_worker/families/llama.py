"""Llama and the families that share its decoder layer (SmolLM2, Mistral, Qwen2-style configs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shard_worker.families.base import Family, StageModules
from shard_worker.kv_cache import ATTENTION
from shard_worker.transformers_adapter import (
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    call_layer,
    use_attention,
)
from shardline.families import LLAMA


class Llama(Family):
    names = LLAMA
    prefixes = {"embed": "model.embed_tokens", "layers": "model.layers", "norm": "model.norm", "head": "lm_head"}
    quantizations = frozenset({"int8"})

    def config_class(self) -> Any:
        return LlamaConfig

    def build(self, config: Any, start: int, end: int) -> StageModules:
        use_attention(config, ATTENTION)  # each session's KV read in place
        mods = StageModules()
        with torch.device("meta"):
            if start == 0:
                mods.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            for i in range(start, end):
                mods.layers[str(i)] = LlamaDecoderLayer(config, i)
            if end == config.num_hidden_layers:
                mods.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
                mods.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # rotary frequencies are computed, not stored: build them for real (a few KB)
        mods.rotary = LlamaRotaryEmbedding(config)
        return mods

    def embed(self, modules: StageModules, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # rotary positions enter in the attention, not here
        if modules.embed is None:
            raise RuntimeError("this stage has no embedding")
        return modules.embed(token_ids)  # type: ignore[no-any-return]

    def rope(self, modules: StageModules, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        if modules.rotary is None:
            raise RuntimeError("this stage has no rotary embedding")
        return modules.rotary(hidden, positions)

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor | None, cache: Any, rope: Any) -> Any:
        return call_layer(layer, hidden, cache, attention_mask=mask, position_ids=positions,
                          position_embeddings=rope)
