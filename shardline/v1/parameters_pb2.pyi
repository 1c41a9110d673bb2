from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListStoredModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStoredModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "size_bytes", "sha256", "part", "layer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    size_bytes: int
    sha256: str
    part: str
    layer: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., part: _Optional[str] = ..., layer: _Optional[int] = ...) -> None: ...

class GetManifestResponse(_message.Message):
    __slots__ = ("model", "family", "config_json", "num_layers", "tensors", "total_size_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    family: str
    config_json: str
    num_layers: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    total_size_bytes: int
    def __init__(self, model: _Optional[str] = ..., family: _Optional[str] = ..., config_json: _Optional[str] = ..., num_layers: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., total_size_bytes: _Optional[int] = ...) -> None: ...

class TensorRequest(_message.Message):
    __slots__ = ("name", "offset_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset_bytes: int
    def __init__(self, name: _Optional[str] = ..., offset_bytes: _Optional[int] = ...) -> None: ...

class FetchTensorsRequest(_message.Message):
    __slots__ = ("model", "tensors", "chunk_size_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorRequest]
    chunk_size_bytes: int
    def __init__(self, model: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorRequest, _Mapping]]] = ..., chunk_size_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "offset_bytes", "total_size_bytes", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset_bytes: int
    total_size_bytes: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., offset_bytes: _Optional[int] = ..., total_size_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("bytes_sent", "chunks_sent", "tensors_sent")
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_SENT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_SENT_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    chunks_sent: int
    tensors_sent: int
    def __init__(self, bytes_sent: _Optional[int] = ..., chunks_sent: _Optional[int] = ..., tensors_sent: _Optional[int] = ...) -> None: ...
