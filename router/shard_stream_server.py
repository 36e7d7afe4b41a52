"""The shard's side of the dispatch stream (`zayaserve.expert.v1.ExpertStream/Dispatch`): a
bidirectional stream of raw messages (`stream_wire`), one per (micro-batch, layer), answered in
order. A refused message gets an in-band status and the stream goes on; the stream itself is
authenticated once, when it opens (the server's token interceptor sees its metadata)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from zayaserve.router.stream_wire import (
    WireError,
    call_id_of,
    decode_rows,
    encode_answer,
    encode_refusal,
)

if TYPE_CHECKING:
    from zayaserve.router.shard_server import ExpertShardServicer

STREAM_SERVICE = "zayaserve.expert.v1.ExpertStream"
STREAM_METHOD = f"/{STREAM_SERVICE}/Dispatch"


def stream_handler(servicer: ExpertShardServicer) -> grpc.GenericRpcHandler:
    from zayaserve.router.shard_server import Refusal

    async def dispatch(requests: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for data in requests:
            call_id = call_id_of(data)
            try:
                rows = decode_rows(data)
                out = await servicer.serve_rows(rows.layer, rows.hidden, rows.expert_ids,
                                                rows.weights, rows.placement_version)
            except WireError as e:
                yield encode_refusal(call_id, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Refusal as r:
                yield encode_refusal(call_id, r.code, r.details)
            else:
                yield encode_answer(call_id, out)

    handlers: dict[str, Any] = {"Dispatch": grpc.stream_stream_rpc_method_handler(dispatch)}
    return grpc.method_handlers_generic_handler(STREAM_SERVICE, handlers)
