"""Where a worker computes: the device of `--device` (cpu, cuda, cuda:N) and the compute dtype of `--dtype`,
checked at start so that a worker that cannot run refuses in one line naming what is missing; what the
device is (name, memory) for GetStatus and registration; and the host <-> device copies of activations
(pinned host buffers, a side CUDA stream). On CPU every copy is the tensor itself: the CPU path is unchanged.
"""

from __future__ import annotations

import os
import platform
import re
import threading
from dataclasses import dataclass
from functools import cache

import psutil
import torch

from shardline.codec import dtype_to_enum
from shardline.v1 import tensor_pb2

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
TORCH_COMPUTE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CUDA_BUDGET_SHARE = 0.9  # of the device's free memory at start: the default budget of a CUDA worker


# the worker's intended torch thread count: torch's default when this module is first imported (on the main
# thread, before any compute), or --compute-threads (set_compute_threads). Kept here, not read back from torch:
# torch's global count is what a new thread picks up at its first parallel operation, and a thread that starts
# while another is inside kv_cache._one_thread (count 1) would otherwise stay on one thread for good
_COMPUTE_THREADS = [torch.get_num_threads()]


def compute_threads() -> int:
    """The worker's intended torch thread count (see _COMPUTE_THREADS)."""
    return _COMPUTE_THREADS[0]


def set_compute_threads(threads: int) -> None:
    """--compute-threads: the intended count, applied to torch now (the calling thread and the global)."""
    _COMPUTE_THREADS[0] = threads
    torch.set_num_threads(threads)


def init_thread(device: torch.device) -> None:
    """The initializer of a worker's compute and loader threads: the intended thread count on this thread,
    whatever torch's global count is at this moment, and (CUDA) the worker's device as this thread's current
    one, so that pinned buffers and the current stream are not on cuda:0."""
    torch.get_num_threads()  # torch's lazy per-thread set-up, which reads the global count, happens first...
    torch.set_num_threads(compute_threads())  # ...then this thread's own count is set to the intended one
    if device.type == "cuda":
        torch.cuda.set_device(device)


class DeviceError(ValueError):
    """A device, dtype or engine this worker cannot run: the message says what is missing and how to get it."""


@dataclass(frozen=True)
class DeviceInfo:
    device: str               # "cpu" or "cuda:N"
    name: str                 # "NVIDIA H100 80GB HBM3", or the CPU's model name
    memory_total_bytes: int   # the GPU's memory, or the host's RAM for a CPU worker
    memory_free_bytes: int    # free now (host: available)


@dataclass(frozen=True)
class DeviceSettings:
    """A worker's `--device`, `--dtype` and `--engine`, checked. `dtype` "" = each LoadShard's own (float32
    when it names none); a worker started with `--dtype` runs that dtype whatever a LoadShard asks."""

    device: torch.device = torch.device("cpu")
    dtype: str = ""
    engine: str = "torch"
    tp: int = 1

    def compute_dtype(self, requested: str) -> str:
        return self.dtype or requested or "float32"


def cuda_summary() -> str:
    """What torch offers here, for errors: its build and the CUDA devices it sees."""
    count = torch.cuda.device_count() if torch.backends.cuda.is_built() else 0
    build = (f"torch {torch.__version__} is built with CUDA {torch.version.cuda}" if torch.version.cuda
             else f"torch {torch.__version__} is built without CUDA")
    return f"{build} and sees {count} CUDA device{'' if count == 1 else 's'}"


def parse_device(spec: str) -> torch.device:
    """`cpu`, `cuda` (= cuda:0) or `cuda:N`, checked against the devices torch sees."""
    text = spec.strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d{1,4}))?", text)
    if match is None:
        raise DeviceError(f"--device {spec!r} is not cpu, cuda or cuda:N")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count() if torch.backends.cuda.is_built() else 0
    if index >= count:
        hint = ("install a CUDA build of torch (https://pytorch.org/get-started/locally/)" if not torch.version.cuda
                else "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES" if count == 0
                else f"use cuda:0 to cuda:{count - 1}")
        raise DeviceError(f"--device cuda:{index}: there is no such device ({cuda_summary()}); {hint}, "
                          "or run on --device cpu")
    return torch.device("cuda", index)


_CPU_RUNS: dict[torch.dtype, str] = {}  # dtype -> "" when a probe forward ran, else why it failed


def cpu_runs(dtype: torch.dtype) -> str:
    """"" when this torch runs a decoder layer's operations (linear, RMS norm, SiLU, rotary, softmax attention,
    embedding) in `dtype` on CPU; else the error it raised. Probed once per dtype, on a few KB."""
    if dtype not in _CPU_RUNS:
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 4, 16, generator=g).to(dtype)
            w = torch.randn(16, 16, generator=g).to(dtype)
            h = torch.nn.functional.silu(torch.nn.functional.linear(x, w))
            h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(dtype)
            q = h.view(2, 4, 2, 8).transpose(1, 2)
            a = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            e = torch.nn.functional.embedding(torch.tensor([[1, 2]]), w)
            out = torch.cat([a.transpose(1, 2).reshape(2, 4, 16), e.expand(2, 2, 16)], dim=1).softmax(-1)
            _CPU_RUNS[dtype] = "" if bool(torch.isfinite(out.float()).all()) else "its results are not finite"
        except (RuntimeError, NotImplementedError) as exc:
            _CPU_RUNS[dtype] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _CPU_RUNS[dtype]


def bf16_native(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability runs bfloat16 natively (Ampere, 8.0, and later); earlier ones
    only emulate it (torch.cuda.is_bf16_supported() says True on a V100 or T4), slowly."""
    return capability >= (8, 0)


def check_dtype(device: torch.device, dtype: str, what: str = "--dtype") -> None:
    """Refuse a compute dtype the device cannot run (`what`: how the error names the setting)."""
    if dtype not in COMPUTE_DTYPES:
        raise DeviceError(f"{what} {dtype!r} is not a compute dtype ({', '.join(COMPUTE_DTYPES)})")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device) if dtype == "bfloat16" else (0, 0)
        if dtype == "bfloat16" and not bf16_native((major, minor)):
            raise DeviceError(f"{what} bfloat16: {torch.cuda.get_device_name(device)} ({device}, compute "
                              f"capability {major}.{minor}) does not support bfloat16; use --dtype float16")
        return
    failure = cpu_runs(TORCH_COMPUTE[dtype])
    if failure:
        raise DeviceError(f"{what} {dtype}: this torch ({torch.__version__}) cannot run {dtype} on CPU "
                          f"({failure}); use --dtype float32")


@cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return f"{platform.machine() or 'CPU'} ({os.cpu_count()} threads)"


def describe(device: torch.device) -> DeviceInfo:
    """The device's name and memory now (a CPU worker's: the host's RAM, total and available)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # what this process's allocator holds without using it is free for this worker too
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return DeviceInfo(str(device), torch.cuda.get_device_name(device), int(total), int(free + cached))
    memory = psutil.virtual_memory()
    return DeviceInfo("cpu", _cpu_name(), int(memory.total), int(memory.available))


def device_proto(settings: DeviceSettings, dtype: str) -> tensor_pb2.DeviceInfo:
    """The worker's DeviceInfo (GetStatusResponse, RegisterWorkerRequest): its memory as it is now; `dtype` ""
    = each LoadShard's."""
    info = describe(settings.device)
    compute = dtype_to_enum(dtype) if dtype else tensor_pb2.DTYPE_UNSPECIFIED
    return tensor_pb2.DeviceInfo(device=info.device, name=info.name, memory_total_bytes=info.memory_total_bytes,
                                 memory_free_bytes=info.memory_free_bytes, dtype=compute, engine=settings.engine)


def default_cuda_budget(device: torch.device) -> int:
    """A CUDA worker's memory budget (weights + KV + activations) when `--worker-memory-mb` gives none."""
    return int(describe(device).memory_free_bytes * CUDA_BUDGET_SHARE)


# -- activations to and from the wire ------------------------------------------------------------------------
_STREAMS: dict[int, torch.cuda.Stream] = {}
_STREAMS_LOCK = threading.Lock()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _STREAMS_LOCK:
        if index not in _STREAMS:
            _STREAMS[index] = torch.cuda.Stream(device)
        return _STREAMS[index]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (wire bytes, token ids) on `device`: through a pinned buffer, copied on a side stream that
    the compute stream then waits for. On CPU: `t` itself."""
    if device.type != "cuda":
        return t
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        out = staged.to(device, non_blocking=True)  # the pinned block is kept until the copy ends (its event)
    torch.cuda.current_stream(device).wait_stream(stream)
    out.record_stream(torch.cuda.current_stream(device))
    return out


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor on the host, in a pinned buffer, copied on a side stream once the compute stream has
    produced it; returns once the bytes are there. On CPU: `t` itself."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    stream = _side_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        out.copy_(t, non_blocking=True)
        t.record_stream(stream)
    stream.synchronize()
    return out
