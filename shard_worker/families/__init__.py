"""Compute adapters per family, behind one registry (their naming lives in shardline.families)."""

from __future__ import annotations

from shard_worker.families.base import Family, StageModules
from shard_worker.families.bert import Bert
from shard_worker.families.gpt2 import GPT2
from shard_worker.families.llama import Llama

FAMILIES: dict[str, Family] = {family.name: family for family in (Llama(), GPT2(), Bert())}

__all__ = ["FAMILIES", "Family", "StageModules"]
