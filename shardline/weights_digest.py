"""One digest for a model's weights, computed alike by the coordinator (from its store's manifest) and a worker
(from the manifest the parameter service sent): two shards with the same model name, layers and digest hold the
same bytes, so a coordinator that restarts adopts a worker's shard only when its weights did not change."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weights_digest(tensors: Iterable[tuple[str, str]]) -> str:
    """The sha256 of every (tensor name, tensor sha256) in manifest order, hex."""
    h = hashlib.sha256()
    for name, sha in tensors:
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()
