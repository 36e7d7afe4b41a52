"""The dispatch stream (router/shard_stream.py, router/shard_stream_server.py) against real gRPC
shards: raw messages round-trip exactly, refusals come back in-band and the stream goes on,
malformed or oversized messages cannot hurt the shard, the stream needs the token, a shard that
dies mid-stream fails its waiting messages over, and unary calls give the same answers."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import grpc
import pytest
import torch
from test_shard_auth import E, H, _compute, _placement, _run, _shard

from zayaserve.router.placement import PlacementMap
from zayaserve.router.shard_channels import call_metadata
from zayaserve.router.shard_stream_server import STREAM_METHOD
from zayaserve.router.stream_wire import (
    WireError,
    decode_answer,
    decode_rows,
    encode_answer,
    encode_refusal,
    encode_rows,
)
from zayaserve.router.token_router import ExpertShardError, TokenRouter

TOKEN = secrets.token_urlsafe(32)


def _rows(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H, generator=g).to(dtype), torch.randint(0, E, (n,), generator=g),
            torch.rand(n, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wire_round_trips_bit_for_bit(dtype: torch.dtype) -> None:
    hidden, ids, w = _rows(5, dtype=dtype)
    rows = decode_rows(encode_rows(7, 3, hidden, ids, w, 42))
    assert (rows.call_id, rows.layer, rows.placement_version) == (7, 3, 42)
    assert torch.equal(rows.hidden.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       hidden.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(rows.expert_ids, ids) and torch.equal(rows.weights, w)
    answer = decode_answer(encode_answer(9, hidden))
    assert answer.call_id == 9 and answer.status is grpc.StatusCode.OK
    assert answer.out is not None and torch.equal(answer.out, hidden)
    refused = decode_answer(encode_refusal(9, grpc.StatusCode.FAILED_PRECONDITION, "stale é"))
    assert refused.out is None and refused.details == "stale é"
    empty = decode_rows(encode_rows(1, 0, hidden[:0], ids[:0], w[:0], 1))
    assert empty.hidden.shape == (0, H)


def test_malformed_messages_are_named() -> None:
    good = encode_rows(1, 0, *_rows(4), 1)
    for bad, field in ((good[:10], "header"), (good[:-3], "weights"),
                       (good + b"x", "past the weights")):
        with pytest.raises(WireError, match=field):
            decode_rows(bad)
    header = bytearray(good)
    header[28] = 9  # an unknown hidden dtype
    with pytest.raises(WireError, match="dtypes"):
        decode_rows(bytes(header))


def test_refusals_come_back_in_band_and_the_stream_goes_on() -> None:
    """Garbage, a layer out of range and experts the shard does not hold are answered on the
    stream with their status; the same stream then serves good rows."""
    async def main() -> None:
        servicer, server = await _shard(token=TOKEN)
        async with grpc.aio.insecure_channel(servicer.address) as channel:
            call = channel.stream_stream(STREAM_METHOD)(metadata=call_metadata(TOKEN))
            hidden, ids, w = _rows(6)
            sends = [b"\x05" * 40, encode_rows(2, 9, hidden, ids, w, 1),
                     encode_rows(3, 1, hidden, torch.full((6,), E), w, 1),
                     encode_rows(4, 1, hidden, ids, w, 1)]
            answers = []
            for data in sends:
                await call.write(data)
                answers.append(decode_answer(await call.read()))
            await call.done_writing()
        codes = [a.status for a in answers]
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT,
                         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OK]
        assert "layer: 9" in answers[1].details and f"experts [{E}]" in answers[2].details
        assert answers[3].call_id == 4 and answers[3].out is not None
        assert torch.equal(answers[3].out, _compute()(1, hidden, ids, w))
        assert servicer.requests == 1 and servicer.calls_in_flight == 0
        await server.stop(None)

    _run(main())


def test_the_stream_needs_the_token() -> None:
    async def main() -> None:
        servicer, server = await _shard(token=TOKEN)
        async with grpc.aio.insecure_channel(servicer.address) as channel:
            for metadata in (None, call_metadata("wrong")):
                call = channel.stream_stream(STREAM_METHOD)(metadata=metadata)
                await call.write(encode_rows(1, 1, *_rows(2), 1))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert servicer.requests == 0
        router = TokenRouter(lambda: _placement(servicer.address), E, token="wrong",
                             wait_for_replica_s=1.0)
        with pytest.raises(ExpertShardError, match="UNAUTHENTICATED"):
            await router.dispatch(1, *_rows(3))
        await router.close()
        await server.stop(None)

    _run(main())


@pytest.mark.parametrize("stream", [True, False])
def test_stream_and_unary_give_the_same_answers(stream: bool) -> None:
    async def main() -> None:
        servicer, server = await _shard(token=TOKEN)
        router = TokenRouter(lambda: _placement(servicer.address), E, token=TOKEN,
                             stream=stream)
        for seed, n in enumerate((1, 17, 64)):
            hidden, ids, w = _rows(n, seed, torch.bfloat16)
            ids[1::5] = E  # skip rows are never sent
            out = await router.dispatch(1, hidden, ids, w)
            sent = ids != E
            want = torch.zeros_like(hidden)
            want[sent] = _compute()(1, hidden[sent], ids[sent], w[sent])
            assert torch.equal(out, want)
        assert router.stats.calls == 3 and router.stats.retries == 0
        await router.close()
        await server.stop(None)

    _run(main())


def test_a_shard_dying_mid_stream_fails_over_to_its_replica() -> None:
    """Two shards hold every expert; the preferred one is stopped while messages are waiting
    on its stream (its compute is slow). They fail with the stream and go to the other."""
    async def main() -> None:
        slow, slow_server = await _shard(delay_s=0.5)
        spare, spare_server = await _shard()
        placement = PlacementMap(1, E, {e: ("a", "b") for e in range(E)},
                                 {"a": slow.address, "b": spare.address})
        router = TokenRouter(lambda: placement, E, wait_for_replica_s=10.0)
        calls = [router.dispatch(1, *_rows(4, seed)) for seed in range(3)]
        pending = asyncio.gather(*calls)
        await asyncio.sleep(0.2)
        await slow_server.stop(None)
        outs = await asyncio.wait_for(pending, 20)
        for seed, out in enumerate(outs):
            hidden, ids, w = _rows(4, seed)
            assert torch.equal(out, _compute()(1, hidden, ids, w))
        assert router.stats.retries >= 1 and spare.requests >= 1
        await router.close()
        await spare_server.stop(None)

    _run(main())


def test_an_answer_past_the_deadline_ends_the_stream_and_is_retried() -> None:
    async def main() -> None:
        slow, server = await _shard(delay_s=0.6)
        router = TokenRouter(lambda: _placement(slow.address), E, deadline_s=0.2,
                             max_retries=1, wait_for_replica_s=2.0)
        with pytest.raises(ExpertShardError, match="DEADLINE_EXCEEDED"):
            await router.dispatch(1, *_rows(2))
        assert router.stats.failed_calls == 2  # the first try and its one retry
        await router.close()
        await server.stop(None)

    _run(main())


def test_a_shard_that_stops_reading_cannot_hang_a_dispatch() -> None:
    """A peer that takes the stream and never reads it (a frozen process): large messages
    fill the flow-control window, so even the write must be bounded by the deadline."""
    from zayaserve.router.shard_stream_server import STREAM_SERVICE

    async def main() -> None:
        stuck = asyncio.Event()

        async def never_reads(requests: Any, context: Any) -> Any:
            await stuck.wait()
            yield b""

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            STREAM_SERVICE, {"Dispatch": grpc.stream_stream_rpc_method_handler(never_reads)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        router = TokenRouter(lambda: _placement(f"127.0.0.1:{port}"), E, deadline_s=0.5,
                             max_retries=1, wait_for_replica_s=5.0)
        hidden, ids, w = torch.randn(20000, H), torch.ones(20000, dtype=torch.int64), \
            torch.rand(20000)  # ~5 MB a message
        start = asyncio.get_running_loop().time()
        with pytest.raises(ExpertShardError, match="DEADLINE_EXCEEDED"):
            await router.dispatch(1, hidden, ids, w)
        assert asyncio.get_running_loop().time() - start < 5
        stuck.set()
        await router.close()
        await server.stop(None)

    _run(main())
