from shardline.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightQuantization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_QUANTIZATION_UNSPECIFIED: _ClassVar[WeightQuantization]
    WEIGHT_QUANTIZATION_NONE: _ClassVar[WeightQuantization]
    WEIGHT_QUANTIZATION_INT8: _ClassVar[WeightQuantization]

class LoadPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_PHASE_UNSPECIFIED: _ClassVar[LoadPhase]
    LOAD_PHASE_MANIFEST: _ClassVar[LoadPhase]
    LOAD_PHASE_FETCHING: _ClassVar[LoadPhase]
    LOAD_PHASE_BUILDING: _ClassVar[LoadPhase]
    LOAD_PHASE_READY: _ClassVar[LoadPhase]

class OutputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_KIND_UNSPECIFIED: _ClassVar[OutputKind]
    OUTPUT_KIND_TOKENS: _ClassVar[OutputKind]
    OUTPUT_KIND_LOGITS: _ClassVar[OutputKind]
    OUTPUT_KIND_LAST_LOGITS: _ClassVar[OutputKind]
    OUTPUT_KIND_HIDDEN: _ClassVar[OutputKind]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_EMPTY: _ClassVar[WorkerState]
    WORKER_STATE_LOADING: _ClassVar[WorkerState]
    WORKER_STATE_READY: _ClassVar[WorkerState]
    WORKER_STATE_FAILED: _ClassVar[WorkerState]
WEIGHT_QUANTIZATION_UNSPECIFIED: WeightQuantization
WEIGHT_QUANTIZATION_NONE: WeightQuantization
WEIGHT_QUANTIZATION_INT8: WeightQuantization
LOAD_PHASE_UNSPECIFIED: LoadPhase
LOAD_PHASE_MANIFEST: LoadPhase
LOAD_PHASE_FETCHING: LoadPhase
LOAD_PHASE_BUILDING: LoadPhase
LOAD_PHASE_READY: LoadPhase
OUTPUT_KIND_UNSPECIFIED: OutputKind
OUTPUT_KIND_TOKENS: OutputKind
OUTPUT_KIND_LOGITS: OutputKind
OUTPUT_KIND_LAST_LOGITS: OutputKind
OUTPUT_KIND_HIDDEN: OutputKind
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_EMPTY: WorkerState
WORKER_STATE_LOADING: WorkerState
WORKER_STATE_READY: WorkerState
WORKER_STATE_FAILED: WorkerState

class CalibrateRequest(_message.Message):
    __slots__ = ("family", "config_json", "dtype", "sequences", "tokens", "context_tokens", "max_ms", "payload")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    family: str
    config_json: str
    dtype: _tensor_pb2.DType
    sequences: int
    tokens: int
    context_tokens: int
    max_ms: int
    payload: bytes
    def __init__(self, family: _Optional[str] = ..., config_json: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., sequences: _Optional[int] = ..., tokens: _Optional[int] = ..., context_tokens: _Optional[int] = ..., max_ms: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class CalibrateResponse(_message.Message):
    __slots__ = ("seconds_per_layer", "repeats", "activation_bytes_per_token", "threads", "payload")
    SECONDS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    seconds_per_layer: float
    repeats: int
    activation_bytes_per_token: int
    threads: int
    payload: bytes
    def __init__(self, seconds_per_layer: _Optional[float] = ..., repeats: _Optional[int] = ..., activation_bytes_per_token: _Optional[int] = ..., threads: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class SetPeersRequest(_message.Message):
    __slots__ = ("addresses",)
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPeersResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadShardRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadShardResponse(_message.Message):
    __slots__ = ("freed_weight_bytes", "sessions_ended")
    FREED_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_ENDED_FIELD_NUMBER: _ClassVar[int]
    freed_weight_bytes: int
    sessions_ended: int
    def __init__(self, freed_weight_bytes: _Optional[int] = ..., sessions_ended: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("model", "start_layer", "end_layer", "dtype", "parameters_address", "timeout_ms", "max_step_tokens", "prefill_chunk_tokens", "kv_block_tokens", "session_ttl_ms", "max_step_sequences", "weights_digest", "wire_dtype", "quantize")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    start_layer: int
    end_layer: int
    dtype: _tensor_pb2.DType
    parameters_address: str
    timeout_ms: int
    max_step_tokens: int
    prefill_chunk_tokens: int
    kv_block_tokens: int
    session_ttl_ms: int
    max_step_sequences: int
    weights_digest: str
    wire_dtype: _tensor_pb2.DType
    quantize: WeightQuantization
    def __init__(self, model: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., parameters_address: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., prefill_chunk_tokens: _Optional[int] = ..., kv_block_tokens: _Optional[int] = ..., session_ttl_ms: _Optional[int] = ..., max_step_sequences: _Optional[int] = ..., weights_digest: _Optional[str] = ..., wire_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., quantize: _Optional[_Union[WeightQuantization, str]] = ...) -> None: ...

class LoadShardProgress(_message.Message):
    __slots__ = ("phase", "bytes_done", "bytes_total", "tensors_done", "tensors_total", "tensor")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_DONE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    phase: LoadPhase
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    tensor: str
    def __init__(self, phase: _Optional[_Union[LoadPhase, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., tensors_done: _Optional[int] = ..., tensors_total: _Optional[int] = ..., tensor: _Optional[str] = ...) -> None: ...

class SequenceSlice(_message.Message):
    __slots__ = ("session_id", "start_position", "num_tokens", "sampling", "traceparent", "prefix_blocks", "prefix_tokens", "token_ids", "allowed_tokens", "fork_from")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORK_FROM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_position: int
    num_tokens: int
    sampling: SamplingParams
    traceparent: str
    prefix_blocks: _containers.RepeatedScalarFieldContainer[bytes]
    prefix_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    allowed_tokens: bytes
    fork_from: str
    def __init__(self, session_id: _Optional[str] = ..., start_position: _Optional[int] = ..., num_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., traceparent: _Optional[str] = ..., prefix_blocks: _Optional[_Iterable[bytes]] = ..., prefix_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., allowed_tokens: _Optional[bytes] = ..., fork_from: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty", "min_p", "logit_bias", "logprobs", "prompt_logprobs", "prompt_tokens")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    min_p: float
    logit_bias: _containers.ScalarMap[int, float]
    logprobs: int
    prompt_logprobs: int
    prompt_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., min_p: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("step_id", "sequences", "token_ids", "hidden", "start_layer", "route", "output", "timeout_ms", "failed", "hidden_scale")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SCALE_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceSlice]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hidden: _tensor_pb2.Tensor
    start_layer: int
    route: _containers.RepeatedScalarFieldContainer[str]
    output: OutputKind
    timeout_ms: int
    failed: _containers.RepeatedCompositeFieldContainer[SequenceError]
    hidden_scale: _tensor_pb2.Tensor
    def __init__(self, step_id: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceSlice, _Mapping]]] = ..., token_ids: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., start_layer: _Optional[int] = ..., route: _Optional[_Iterable[str]] = ..., output: _Optional[_Union[OutputKind, str]] = ..., timeout_ms: _Optional[int] = ..., failed: _Optional[_Iterable[_Union[SequenceError, _Mapping]]] = ..., hidden_scale: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SequenceError(_message.Message):
    __slots__ = ("session_id", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    error: _tensor_pb2.ErrorStatus
    def __init__(self, session_id: _Optional[str] = ..., error: _Optional[_Union[_tensor_pb2.ErrorStatus, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("step_id", "error", "token_ids", "tensor", "sequence_errors", "logprobs")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    error: _tensor_pb2.ErrorStatus
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tensor: _tensor_pb2.Tensor
    sequence_errors: _containers.RepeatedCompositeFieldContainer[SequenceError]
    logprobs: _containers.RepeatedCompositeFieldContainer[SequenceLogprobs]
    def __init__(self, step_id: _Optional[int] = ..., error: _Optional[_Union[_tensor_pb2.ErrorStatus, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sequence_errors: _Optional[_Iterable[_Union[SequenceError, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[SequenceLogprobs, _Mapping]]] = ...) -> None: ...

class ScoredToken(_message.Message):
    __slots__ = ("position", "token_id", "logprob", "top_ids", "top_logprobs")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class SequenceLogprobs(_message.Message):
    __slots__ = ("sampled", "prompt")
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    sampled: ScoredToken
    prompt: _containers.RepeatedCompositeFieldContainer[ScoredToken]
    def __init__(self, sampled: _Optional[_Union[ScoredToken, _Mapping]] = ..., prompt: _Optional[_Iterable[_Union[ScoredToken, _Mapping]]] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_ids",)
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("ended",)
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ended: int
    def __init__(self, ended: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("state", "model", "start_layer", "end_layer", "weight_bytes", "sessions", "kv_cache_bytes", "rss_bytes", "last_error", "has_embedding", "has_head", "metrics", "kv", "loads", "weights_digest", "memory_limit_bytes", "runtime_bytes", "wire_dtype", "quantize", "device")
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    HAS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HAS_HEAD_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    state: WorkerState
    model: str
    start_layer: int
    end_layer: int
    weight_bytes: int
    sessions: int
    kv_cache_bytes: int
    rss_bytes: int
    last_error: str
    has_embedding: bool
    has_head: bool
    metrics: StageMetrics
    kv: KVCapacity
    loads: int
    weights_digest: str
    memory_limit_bytes: int
    runtime_bytes: int
    wire_dtype: _tensor_pb2.DType
    quantize: WeightQuantization
    device: _tensor_pb2.DeviceInfo
    def __init__(self, state: _Optional[_Union[WorkerState, str]] = ..., model: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., sessions: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., last_error: _Optional[str] = ..., has_embedding: _Optional[bool] = ..., has_head: _Optional[bool] = ..., metrics: _Optional[_Union[StageMetrics, _Mapping]] = ..., kv: _Optional[_Union[KVCapacity, _Mapping]] = ..., loads: _Optional[int] = ..., weights_digest: _Optional[str] = ..., memory_limit_bytes: _Optional[int] = ..., runtime_bytes: _Optional[int] = ..., wire_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., quantize: _Optional[_Union[WeightQuantization, str]] = ..., device: _Optional[_Union[_tensor_pb2.DeviceInfo, _Mapping]] = ...) -> None: ...

class KVCapacity(_message.Message):
    __slots__ = ("block_tokens", "block_bytes", "blocks_total", "blocks_used", "capacity_tokens", "capacity_bytes", "headroom_bytes", "memory_budget_bytes", "sessions_expired", "max_step_tokens")
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    block_tokens: int
    block_bytes: int
    blocks_total: int
    blocks_used: int
    capacity_tokens: int
    capacity_bytes: int
    headroom_bytes: int
    memory_budget_bytes: int
    sessions_expired: int
    max_step_tokens: int
    def __init__(self, block_tokens: _Optional[int] = ..., block_bytes: _Optional[int] = ..., blocks_total: _Optional[int] = ..., blocks_used: _Optional[int] = ..., capacity_tokens: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., headroom_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., sessions_expired: _Optional[int] = ..., max_step_tokens: _Optional[int] = ...) -> None: ...

class StageMetrics(_message.Message):
    __slots__ = ("uptime_ms", "busy_ms", "idle_ms", "queue_depth", "steps", "tokens", "bytes_in", "bytes_out", "prefill_tokens", "prefix_tokens_reused", "prefix_blocks", "prefix_cache_bytes", "prefix_evictions")
    UPTIME_MS_FIELD_NUMBER: _ClassVar[int]
    BUSY_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_REUSED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    uptime_ms: int
    busy_ms: int
    idle_ms: int
    queue_depth: int
    steps: int
    tokens: int
    bytes_in: int
    bytes_out: int
    prefill_tokens: int
    prefix_tokens_reused: int
    prefix_blocks: int
    prefix_cache_bytes: int
    prefix_evictions: int
    def __init__(self, uptime_ms: _Optional[int] = ..., busy_ms: _Optional[int] = ..., idle_ms: _Optional[int] = ..., queue_depth: _Optional[int] = ..., steps: _Optional[int] = ..., tokens: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., prefix_tokens_reused: _Optional[int] = ..., prefix_blocks: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ..., prefix_evictions: _Optional[int] = ...) -> None: ...
