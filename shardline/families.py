"""What each model family's checkpoint tensors are called and where they belong: pure naming knowledge,
shared by the importer (which records each tensor's layer in the manifest) and the workers (which fetch
their layers). No torch here; configs are read by attribute."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Placement:
    """Where a tensor belongs: the embedding (first stage), a layer, or the head (last stage)."""

    part: str  # "embed" | "layer" | "head"
    layer: int = -1


@dataclass(frozen=True)
class FamilyNames:
    name: str
    model_types: tuple[str, ...]
    layer_pattern: re.Pattern[str]
    embed_names: tuple[str, ...]
    head_names: tuple[str, ...]
    tied: dict[str, str]  # head weight -> the embedding weight it shares when config.tie_word_embeddings
    layers_field: str

    def placement(self, tensor_name: str) -> Placement:
        match = self.layer_pattern.match(tensor_name)
        if match:
            return Placement("layer", int(match.group(1)))
        if tensor_name in self.embed_names:
            return Placement("embed")
        if tensor_name in self.head_names:
            return Placement("head")
        raise ValueError(f"tensor {tensor_name!r} is not part of a {self.name} model")

    def num_layers(self, config: Any) -> int:
        return int(getattr(config, self.layers_field))

    def is_tied(self, config: Any) -> bool:
        return bool(getattr(config, "tie_word_embeddings", False))

    def head_tensor_names(self, config: Any) -> tuple[str, ...]:
        """Names the last stage loads: the head's own, or the embedding it is tied to."""
        if self.is_tied(config):
            return tuple(self.tied.get(n, n) for n in self.head_names)
        return self.head_names

    def stage_tensor_names(self, config: Any, names: list[str], start: int, end: int) -> list[str]:
        """Of a checkpoint's tensor names, those a stage hosting [start, end) loads."""
        wanted = [n for n in names if (p := self.placement(n)).part == "layer" and start <= p.layer < end
                  or p.part == "embed" and start == 0]
        if end == self.num_layers(config):
            wanted += [n for n in self.head_tensor_names(config) if n not in wanted]
        return wanted


LLAMA = FamilyNames(
    name="llama", model_types=("llama", "mistral"), layer_pattern=re.compile(r"^model\.layers\.(\d+)\."),
    embed_names=("model.embed_tokens.weight",), head_names=("model.norm.weight", "lm_head.weight"),
    tied={"lm_head.weight": "model.embed_tokens.weight"}, layers_field="num_hidden_layers")
GPT2 = FamilyNames(
    name="gpt2", model_types=("gpt2",), layer_pattern=re.compile(r"^transformer\.h\.(\d+)\."),
    embed_names=("transformer.wte.weight", "transformer.wpe.weight"),
    head_names=("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"),
    tied={"lm_head.weight": "transformer.wte.weight"}, layers_field="n_layer")

BERT = FamilyNames(
    name="bert", model_types=("bert",), layer_pattern=re.compile(r"^encoder\.layer\.(\d+)\."),
    embed_names=("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                 "embeddings.LayerNorm.bias", "embeddings.position_ids"),
    head_names=("pooler.dense.weight", "pooler.dense.bias"), tied={}, layers_field="num_hidden_layers")

FAMILY_NAMES: dict[str, FamilyNames] = {f.name: f for f in (LLAMA, GPT2, BERT)}


def names_for_model_type(model_type: str) -> FamilyNames:
    """The family serving a config's model_type; a clear error naming what is supported otherwise."""
    for family in FAMILY_NAMES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILY_NAMES.values() for t in f.model_types)
    raise ValueError(f"unsupported model type {model_type!r} (supported: {', '.join(supported)})")
