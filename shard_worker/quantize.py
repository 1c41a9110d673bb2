"""Weight-only int8 quantization of a stage's linear layers, at load (LoadShard `quantize`).

Every linear weight of the decoder layers becomes int8 with a scale per output channel (symmetric:
scale = max|row| / 127); the matmul dequantizes (`x @ q.T * scale`), so activations stay in the compute dtype.
Embeddings, norms and the LM head keep their dtype (the head is often tied to the embedding, and it decides
the sampled token). Only the families whose accuracy is measured (decoders: perplexity on
shardline/data/accuracy.txt against fp32) offer it; another family is refused before anything is fetched.
"""

from __future__ import annotations

import torch
from torch import nn

from shard_worker.transformers_adapter import Conv1D
from shardline.errors import InvalidArgument
from shardline.v1 import worker_pb2

QUANTIZATIONS: dict[int, str] = {worker_pb2.WEIGHT_QUANTIZATION_UNSPECIFIED: "",
                                 worker_pb2.WEIGHT_QUANTIZATION_NONE: "", worker_pb2.WEIGHT_QUANTIZATION_INT8: "int8"}
INT8_MAX = 127.0


def quantization_from_enum(value: int) -> str:
    """LoadShard's `quantize`: "" (none) or "int8"; INVALID_ARGUMENT for an unknown value."""
    if value not in QUANTIZATIONS:
        raise InvalidArgument(f"quantize {value} is not a known WeightQuantization (NONE or INT8)")
    return QUANTIZATIONS[value]


def quantization_to_enum(name: str) -> worker_pb2.WeightQuantization:
    return worker_pb2.WEIGHT_QUANTIZATION_INT8 if name == "int8" else worker_pb2.WEIGHT_QUANTIZATION_NONE


def check_supported(quantize: str, family: str, supported: frozenset[str]) -> None:
    """Refuse, before anything is fetched, a quantization the family does not offer."""
    if quantize and quantize not in supported:
        offered = ", ".join(sorted(supported)) or "none"
        raise InvalidArgument(f"quantize {quantize}: family {family!r} does not support weight quantization "
                              f"{quantize} (it offers: {offered}); load it without --quantize")


class Int8Linear(nn.Module):
    """A linear layer with int8 weights [out, in] and a scale per output channel, dequantized in the matmul."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1) / INT8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.in_features, self.out_features = int(w.shape[1]), int(w.shape[0])
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one layer's weight is widened at a time, transiently: x @ (q * s).T == (x @ q.T) * s
        y = torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(root: nn.Module, dtype: torch.dtype) -> int:
    """Replace every nn.Linear / GPT-2 Conv1D under `root` with an Int8Linear, in place; returns how many."""
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if isinstance(child, nn.Linear):
                new = Int8Linear(child.weight, child.bias, dtype)
            elif isinstance(child, Conv1D):  # GPT-2 stores [in, out]
                new = Int8Linear(child.weight.t(), child.bias, dtype)
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
    return replaced


def held_bytes(module: nn.Module) -> int:
    """Bytes of the tensors a module holds (parameters and buffers, each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
