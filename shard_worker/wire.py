"""Hidden states on the wire (shardline/wire_dtype.py): the producer converts its output to the link's wire
dtype, the receiver converts what it gets to its compute dtype."""

from __future__ import annotations

import warnings

import torch

from shard_worker.device import to_device, to_host
from shardline.codec import RawTensor
from shardline.errors import InvalidArgument
from shardline.wire_dtype import WIRE_DTYPES

TORCH_WIRE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_MAX = 127.0
CPU = torch.device("cpu")


def raw_from_torch(t: torch.Tensor) -> RawTensor:
    """The tensor's bytes for the wire; a device tensor comes to the host first (through a pinned buffer)."""
    dtype = str(t.dtype).removeprefix("torch.")
    t = to_host(t)
    data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return RawTensor(dtype, tuple(t.shape), data)


def _tensor(raw: RawTensor) -> torch.Tensor:
    dtype = TORCH_WIRE[raw.dtype]
    if not raw.data:
        return torch.empty(raw.shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only wire bytes: never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw.data, dtype=dtype).view(raw.shape)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and a float32 scale per row (symmetric: scale = max|row| / 127; an all-zero row gets 1)."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def encode_hidden(x: torch.Tensor, wire: str) -> tuple[RawTensor, RawTensor | None]:
    """[T, hidden] in the link's wire dtype: (hidden, its per-row scale for int8, else None)."""
    if wire == "int8":
        q, scale = quantize_rows(x)
        return raw_from_torch(q), raw_from_torch(scale)
    return raw_from_torch(x.to(TORCH_WIRE[wire])), None


def check_hidden(hidden: RawTensor, scale: RawTensor | None, rows: int) -> None:
    """What a receiving stage accepts: any wire dtype, int8 only with a float32 scale per row."""
    if hidden.dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"hidden.dtype {hidden.dtype} is not a wire dtype this stage takes (supported: "
                              f"{', '.join(WIRE_DTYPES)}; int8 with hidden_scale)")
    if hidden.dtype == "int8":
        if scale is None:
            raise InvalidArgument("hidden.dtype is int8 but hidden_scale is missing: int8 hidden states need a "
                                  "float32 scale per row")
        if scale.dtype != "float32" or scale.shape != (rows,):
            raise InvalidArgument(f"hidden_scale is {scale.dtype} {list(scale.shape)}; int8 hidden states need "
                                  f"float32 [{rows}] (one scale per row)")
        values = _tensor(scale)
        bad = (~torch.isfinite(values) | (values <= 0)).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise InvalidArgument(f"hidden_scale[{i}] is {float(values[i])}: a row's scale must be finite and "
                                  "positive")
    elif scale is not None:
        raise InvalidArgument(f"hidden_scale is set but hidden.dtype is {hidden.dtype}: only int8 takes a scale")


def decode_hidden(hidden: RawTensor, scale: RawTensor | None, dtype: torch.dtype,
                  device: torch.device = CPU) -> torch.Tensor:
    """The received hidden states in the stage's compute dtype, on its device (checked by check_hidden
    first): the wire bytes go to the device as they are and are converted there."""
    x = to_device(_tensor(hidden), device)
    if hidden.dtype == "int8":
        if scale is None:
            raise InvalidArgument("hidden.dtype is int8 but hidden_scale is missing")
        return (x.float() * to_device(_tensor(scale), device)[:, None]).to(dtype)
    return x if x.dtype == dtype else x.to(dtype)
