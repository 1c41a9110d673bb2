"""Per-family knowledge behind one registry: config, tensor-name -> layer, stage construction."""

from __future__ import annotations

from shard_worker.families.base import Family, Placement, StageModules
from shard_worker.families.gpt2 import GPT2
from shard_worker.families.llama import Llama

FAMILIES: dict[str, Family] = {family.name: family for family in (Llama(), GPT2())}
# transformers' model_type values each family serves
MODEL_TYPES: dict[str, str] = {
    model_type: family.name for family in FAMILIES.values() for model_type in family.model_types
}


def family_for(model_type: str) -> Family:
    """The adapter for a config's model_type; a clear error naming what is supported otherwise."""
    name = MODEL_TYPES.get(model_type)
    if name is None:
        raise ValueError(f"unsupported model type {model_type!r} (supported: {', '.join(sorted(MODEL_TYPES))})")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "Placement", "StageModules", "family_for"]
