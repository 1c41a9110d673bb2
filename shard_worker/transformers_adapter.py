"""The one place shardline touches the internals of Hugging Face `transformers`.

A stage reuses transformers' decoder layers but not its models, caches or masks, so it relies on a handful
of things transformers does not promise to keep. Each is a named contract point, used only through this
module and checked by a unit test (tests/unit/test_transformers_contract.py) that names the installed
version when it breaks:

- `attention-hook`: `AttentionInterface.register(name, fn)` plus `config._attn_implementation = name`
  route a layer's attention to `fn(module, query, key, value, mask, scaling=..., **kwargs)`, with
  `module.layer_idx` the global layer index and query [B, heads, N, head_dim].
- `cache-update`: a layer given a cache calls `cache.update(key, value, layer_idx, ...)` once with the
  new keys [B, kv_heads, N, head_dim] (after rotary), and attends over what `update` returns. Extra
  positional or keyword arguments vary by release (5.25 added `kwargs=`): a cache takes and ignores them.
- `layer-call`: a decoder layer is called with `hidden_states` [B, N, hidden] and keyword arguments
  (`attention_mask`, `position_ids`, `position_embeddings`, and the cache under the name its `forward`
  declares: `cache` from 5.25, `past_key_values` before); it returns the hidden states or a tuple that
  starts with them.
- `rotary`: `LlamaRotaryEmbedding(config)(x, position_ids)` returns (cos, sin), each [B, N, head_dim].
- `config-fields`: the config attributes the families read (layer counts, heads, norms' epsilon).
- `conv1d`: GPT-2's `Conv1D` keeps its weight as [in, out] (quantize.py transposes it).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn
from transformers import AttentionInterface, BertConfig, GPT2Config, LlamaConfig
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)

# The releases shardline is tested on; pyproject.toml's server extra says the same (a unit test checks).
TESTED = SpecifierSet(">=5.23,<5.26")
VERSION = transformers.__version__

__all__ = [
    "TESTED", "VERSION", "BertConfig", "BertLayer", "Conv1D", "GPT2Block", "GPT2Config", "LlamaConfig",
    "LlamaDecoderLayer", "LlamaRMSNorm", "LlamaRotaryEmbedding", "call_layer", "cache_argument",
    "check_version", "register_attention", "use_attention",
]


def outside_tested_range() -> str:
    """A sentence naming both versions when the installed transformers is not one shardline is tested on;
    "" when it is."""
    if Version(VERSION) in TESTED:
        return ""
    return (f"transformers {VERSION} is installed, but shardline is tested on transformers {TESTED}: stages may "
            "fail to load or differ from the reference (install the lock: make setup)")


def check_version() -> None:
    """Log one WARNING at start when the installed transformers is outside the tested range."""
    warning = outside_tested_range()
    if warning:
        log.warning("%s", warning)


def register_attention(name: str, fn: Callable[..., Any]) -> None:
    """`attention-hook`: make `fn` available as the attention implementation `name`."""
    AttentionInterface.register(name, fn)


def use_attention(config: Any, name: str) -> None:
    """`attention-hook`: layers built from `config` after this call use the attention `name`."""
    config._attn_implementation = name


def cache_argument(layer_class: type[nn.Module]) -> str:
    """`layer-call`: the keyword a layer class takes its cache under ("cache" or "past_key_values")."""
    params = inspect.signature(layer_class.forward).parameters  # follows the deprecation wrapper's __wrapped__
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"transformers {VERSION}: {layer_class.__name__}.forward takes no cache argument "
                    "(neither `cache` nor `past_key_values`)")


_CACHE_ARGUMENT: dict[type[nn.Module], str] = {}


def call_layer(layer: nn.Module, hidden: Any, cache: Any = None, **kwargs: Any) -> Any:
    """`layer-call`: run one decoder layer; `cache` goes under the name the layer's class declares, the other
    keywords as given. Returns the hidden states (the first element where the layer returns a tuple)."""
    cls = type(layer)
    if cache is not None:
        if cls not in _CACHE_ARGUMENT:
            _CACHE_ARGUMENT[cls] = cache_argument(cls)
        kwargs[_CACHE_ARGUMENT[cls]] = cache
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
