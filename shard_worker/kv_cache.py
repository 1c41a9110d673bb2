"""Per-session key/value caches, and the batch view that Hugging Face attention layers write through."""

from __future__ import annotations

from typing import Any

import torch

_MIN_CAPACITY = 64


class SessionCache:
    """One session's keys and values on this stage: per local layer a [kv_heads, capacity, head_dim]
    buffer, grown by doubling. `length` counts the committed positions."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.length = 0
        self._shape = (kv_heads, head_dim)
        self._dtype = dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values) if t is not None)

    def _buffers(self, layer: int, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None or keys.shape[1] < needed:
            capacity = max(_MIN_CAPACITY, needed, 2 * (keys.shape[1] if keys is not None else 0))
            heads, dim = self._shape
            new_k = torch.empty(heads, capacity, dim, dtype=self._dtype)
            new_v = torch.empty(heads, capacity, dim, dtype=self._dtype)
            if keys is not None and values is not None:
                new_k[:, : keys.shape[1]] = keys
                new_v[:, : values.shape[1]] = values
            self.keys[layer], self.values[layer] = keys, values = new_k, new_v
        return keys, values

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
        """Store [kv_heads, n, head_dim] at positions [start, start+n); return views of [0, start+n)."""
        end = start + key.shape[1]
        keys, values = self._buffers(layer, end)
        keys[:, start:end] = key
        values[:, start:end] = value
        return keys[:, :end], values[:, :end]


class BatchCache:
    """Duck-typed `transformers` Cache for one forward over a padded batch of sessions.

    Layers call `update(key, value, layer_idx)` with the new keys of every sequence ([B, heads, N, dim],
    right-padded); each sequence's own rows go into its session cache, and the attention sees, per
    sequence, its whole past followed by the new rows, right-padded to the longest (the mask hides the pad).
    """

    def __init__(self, sessions: list[SessionCache], starts: list[int], counts: list[int], first_layer: int):
        self.sessions, self.starts, self.counts = sessions, starts, counts
        self.first_layer = first_layer
        self.total = max(s + n for s, n in zip(starts, counts, strict=True))

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        layer = layer_idx - self.first_layer
        if len(self.sessions) == 1:
            keys, values = self.sessions[0].write(layer, self.starts[0], key[0, :, : self.counts[0]],
                                                  value[0, :, : self.counts[0]])
            return keys[None], values[None]
        batch, heads, _, dim = key.shape
        all_keys = key.new_zeros(batch, heads, self.total, dim)
        all_values = value.new_zeros(batch, heads, self.total, dim)
        for b, (session, start, count) in enumerate(zip(self.sessions, self.starts, self.counts, strict=True)):
            keys, values = session.write(layer, start, key[b, :, :count], value[b, :, :count])
            all_keys[b, :, : start + count] = keys
            all_values[b, :, : start + count] = values
        return all_keys, all_values
