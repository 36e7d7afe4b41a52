# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("layer", "hidden", "expert_ids", "weights", "placement_version")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    weights: Tensor
    placement_version: int
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., expert_ids: _Optional[_Iterable[int]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., placement_version: _Optional[int] = ...) -> None: ...

class DispatchResponse(_message.Message):
    __slots__ = ("out", "shard_id")
    OUT_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    out: Tensor
    shard_id: str
    def __init__(self, out: _Optional[_Union[Tensor, _Mapping]] = ..., shard_id: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, experts: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "expert", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    tokens: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard_id", "address", "experts", "per_layer", "num_layers", "expert_bytes", "tokens_served", "pid")
    class PerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: LayerExperts
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[LayerExperts, _Mapping]] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SERVED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    address: str
    experts: _containers.RepeatedScalarFieldContainer[int]
    per_layer: _containers.MessageMap[int, LayerExperts]
    num_layers: int
    expert_bytes: int
    tokens_served: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    pid: int
    def __init__(self, shard_id: _Optional[str] = ..., address: _Optional[str] = ..., experts: _Optional[_Iterable[int]] = ..., per_layer: _Optional[_Mapping[int, LayerExperts]] = ..., num_layers: _Optional[int] = ..., expert_bytes: _Optional[int] = ..., tokens_served: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ..., pid: _Optional[int] = ...) -> None: ...
