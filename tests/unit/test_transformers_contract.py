"""The contract points shardline relies on in transformers' internals (shard_worker/transformers_adapter.py),
one test each. When a release breaks one, the failure names the installed version and the point, so the
person reading CI output knows at once what moved and where to adapt it."""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from packaging.requirements import Requirement

try:
    from shard_worker import transformers_adapter as hf
except ImportError as exc:  # a name the adapter imports is gone or moved
    pytest.fail(f"transformers {transformers.__version__}: contract point `imports` changed "
                f"(shard_worker/transformers_adapter.py): {exc}", pytrace=False)

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def contract(point: str) -> Iterator[None]:
    """Fail with the version and the point's name, whatever broke (an assertion, a missing name, a new
    signature)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - whatever broke, the message names the version and the point
        pytest.fail(f"transformers {hf.VERSION}: contract point `{point}` changed "
                    f"(shard_worker/transformers_adapter.py; tested on {hf.TESTED}): {type(exc).__name__}: {exc}",
                    pytrace=False)


def tiny_llama() -> Any:
    return hf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)


def tiny_gpt2() -> Any:
    return hf.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=64, n_positions=128)


class RecordingCache:
    """A cache that records what layers hand it (the `cache-update` point), as BatchCache receives it."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((layer_idx, tuple(key.shape), tuple(value.shape)))
        return key * 0, value * 0  # attention must see what update returns, not what it was given


class Probe:
    """An attention implementation that records its arguments and answers zeros of the right shape."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> Any:
        self.seen.append({"layer_idx": getattr(module, "layer_idx", None), "query": tuple(query.shape),
                          "key_sum": float(key.abs().sum()), "scaling": scaling})
        batch, heads, n, dim = query.shape
        return query.new_zeros(batch, n, heads, dim), None


def run_llama_layer(cache: Any, attention: str) -> tuple[Any, torch.Tensor]:
    config = tiny_llama()
    hf.use_attention(config, attention)
    layer = hf.LlamaDecoderLayer(config, 2).eval()
    rotary = hf.LlamaRotaryEmbedding(config)
    hidden = torch.randn(2, 3, 32)
    positions = torch.arange(3)[None].expand(2, 3)
    with torch.inference_mode():
        out = hf.call_layer(layer, hidden, cache, attention_mask=None, position_ids=positions,
                            position_embeddings=rotary(hidden, positions))
    return out, hidden


def test_the_tested_range_is_the_one_pyproject_declares():
    with contract("tested-range"):
        server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
        declared = next(Requirement(r) for r in server if Requirement(r).name == "transformers")
        assert declared.specifier == hf.TESTED, f"pyproject says {declared.specifier}, the adapter {hf.TESTED}"


def test_attention_hook_routes_a_layers_attention_with_its_global_index():
    probe = Probe()
    with contract("attention-hook"):
        hf.register_attention("shardline-contract-probe", probe)
        run_llama_layer(None, "shardline-contract-probe")
        assert len(probe.seen) == 1, "the registered attention was not called"
        seen = probe.seen[0]
        assert seen["layer_idx"] == 2, f"module.layer_idx is {seen['layer_idx']}, not the global index 2"
        assert seen["query"] == (2, 4, 3, 8), f"query is {seen['query']}, not [batch, heads, tokens, head_dim]"
        assert seen["scaling"] == pytest.approx(8 ** -0.5)


def test_cache_update_gets_each_layers_new_keys_and_attention_reads_its_answer():
    probe = Probe()
    cache = RecordingCache()
    with contract("cache-update"):
        hf.register_attention("shardline-contract-probe", probe)
        run_llama_layer(cache, "shardline-contract-probe")
        assert cache.calls == [(2, (2, 2, 3, 8), (2, 2, 3, 8))], \
            f"update calls were {cache.calls}, not one (layer 2, keys [batch, kv_heads, tokens, head_dim])"
        assert probe.seen[0]["key_sum"] == 0.0, "attention did not read the keys update returned"


def test_gpt2_blocks_call_the_cache_and_the_hook_the_same_way():
    probe, cache = Probe(), RecordingCache()
    with contract("cache-update"):
        hf.register_attention("shardline-contract-probe", probe)
        config = tiny_gpt2()
        hf.use_attention(config, "shardline-contract-probe")
        block = hf.GPT2Block(config, layer_idx=1).eval()
        with torch.inference_mode():
            out = hf.call_layer(block, torch.randn(2, 3, 32), cache, attention_mask=None)
        assert tuple(out.shape) == (2, 3, 32)
        assert cache.calls == [(1, (2, 4, 3, 8), (2, 4, 3, 8))], f"update calls were {cache.calls}"
        assert probe.seen[0]["layer_idx"] == 1


def test_layer_call_returns_the_hidden_states_and_names_its_cache_argument():
    with contract("layer-call"):
        for cls in (hf.LlamaDecoderLayer, hf.GPT2Block):
            assert hf.cache_argument(cls) in ("cache", "past_key_values")
        out, hidden = run_llama_layer(RecordingCache(), "sdpa")
        assert isinstance(out, torch.Tensor) and out.shape == hidden.shape, \
            f"a decoder layer returned {type(out).__name__} {getattr(out, 'shape', '')}, not [batch, tokens, hidden]"


def test_layer_call_with_sdpa_and_no_cache_equals_a_whole_model_forward():
    """The layer-call conventions (positions, rotary tuple, mask None = causal) give transformers' own
    numbers: one Llama layer through call_layer equals the same layer inside LlamaModel."""
    from transformers import LlamaModel

    with contract("layer-call"):
        config = tiny_llama()
        config.num_hidden_layers = 1
        hf.use_attention(config, "sdpa")
        torch.manual_seed(0)
        model = LlamaModel(config).eval()
        ids = torch.randint(0, 64, (1, 5))
        with torch.inference_mode():
            whole = model(ids).last_hidden_state
            x = model.embed_tokens(ids)
            positions = torch.arange(5)[None]
            x = hf.call_layer(model.layers[0], x, None, attention_mask=None, position_ids=positions,
                              position_embeddings=hf.LlamaRotaryEmbedding(config)(x, positions))
            x = model.norm(x)
        torch.testing.assert_close(x, whole, atol=1e-5, rtol=0)


def test_rotary_gives_cos_and_sin_per_position():
    with contract("rotary"):
        config = tiny_llama()
        cos, sin = hf.LlamaRotaryEmbedding(config)(torch.zeros(2, 3, 32), torch.arange(3)[None].expand(2, 3))
        assert tuple(cos.shape) == (2, 3, 8) and tuple(sin.shape) == (2, 3, 8)
        assert torch.allclose(cos[0, 0], torch.ones(8)), "position 0 must have cos 1"


def test_config_fields_the_families_read():
    with contract("config-fields"):
        llama = tiny_llama()
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
            assert hasattr(llama, field), f"LlamaConfig has no {field}"
        gpt2 = tiny_gpt2()
        assert (gpt2.hidden_size, gpt2.n_layer, gpt2.layer_norm_epsilon, gpt2.max_position_embeddings) == \
            (32, 4, gpt2.layer_norm_epsilon, 128)
        bert = hf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        for field in ("layer_norm_eps", "type_vocab_size", "max_position_embeddings", "vocab_size"):
            assert hasattr(bert, field), f"BertConfig has no {field}"


def test_conv1d_keeps_its_weight_as_in_by_out():
    with contract("conv1d"):
        conv = hf.Conv1D(24, 8)  # nf (out), nx (in)
        assert tuple(conv.weight.shape) == (8, 24), f"Conv1D weight is {tuple(conv.weight.shape)}, not [in, out]"
        x = torch.randn(3, 8)
        torch.testing.assert_close(conv(x), x @ conv.weight + conv.bias)


def test_bert_layer_takes_an_additive_padding_mask():
    with contract("layer-call"):
        config = hf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        hf.use_attention(config, "sdpa")
        layer = hf.BertLayer(config, layer_idx=0).eval()
        x = torch.randn(1, 4, 32)
        masked = torch.zeros(1, 1, 1, 4)
        masked[..., 3] = torch.finfo(torch.float32).min
        with torch.inference_mode():
            short = hf.call_layer(layer, x[:, :3], attention_mask=None)
            padded = hf.call_layer(layer, x, attention_mask=masked)
        torch.testing.assert_close(padded[:, :3], short, atol=1e-5, rtol=0)


def test_shardlines_own_cache_and_attention_run_a_layer_as_transformers_calls_them():
    """BatchCache and the "shardline" attention, driven by a real transformers layer, equal the layer on
    sdpa without a cache: the point that broke when 5.25 began calling `cache.update(..., kwargs=...)`."""
    from shard_worker.kv_cache import ATTENTION, BatchCache, KVLayout, KVPool, SessionCache

    with contract("cache-update"):
        reference_config, config = tiny_llama(), tiny_llama()
        torch.manual_seed(0)
        hf.use_attention(reference_config, "sdpa")
        reference_layer = hf.LlamaDecoderLayer(reference_config, 1).eval()
        hf.use_attention(config, ATTENTION)
        layer = hf.LlamaDecoderLayer(config, 1).eval()
        layer.load_state_dict(reference_layer.state_dict())
        rotary = hf.LlamaRotaryEmbedding(config)
        x = torch.randn(1, 5, 32)
        positions = torch.arange(5)[None]
        rope = rotary(x, positions)
        pool = KVPool(KVLayout(1, 2, 8, torch.float32, 16), 4)
        session = SessionCache(pool)
        session.reserve(5)
        cache = BatchCache([session], [0], 5, first_layer=1)
        with torch.inference_mode():
            expected = hf.call_layer(reference_layer, x, None, attention_mask=None, position_ids=positions,
                                     position_embeddings=rope)
            with cache.activate():
                got = hf.call_layer(layer, x, cache, attention_mask=None, position_ids=positions,
                                    position_embeddings=rope)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
