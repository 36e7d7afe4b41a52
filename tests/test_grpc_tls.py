"""The public gRPC API over TLS: with a certificate and key it serves TLS only (a client that
trusts the certificate gets answers, a plaintext client gets none), and a half-given or
unreadable pair is a config error naming the fields."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from openai_helpers import free_port

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.grpc_server import start_grpc_server
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls_only(engine_client: LocalEngineClient, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    request = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=2))

    async def run() -> tuple[int, grpc.StatusCode | None]:
        port = free_port()
        server = await start_grpc_server(engine_client, port, "127.0.0.1",
                                         tls_cert_file=str(cert), tls_key_file=str(key))
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                reply = await pb_grpc.GenerationStub(channel).GenerateUnary(request)
            plain_code = None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    await pb_grpc.GenerationStub(channel).GenerateUnary(request, timeout=5)
                except grpc.aio.AioRpcError as err:
                    plain_code = err.code()
            return len(reply.outputs[0].token_ids), plain_code
        finally:
            await server.stop(None)

    tokens, plain = asyncio.run(run())
    assert tokens == 2
    assert plain == grpc.StatusCode.UNAVAILABLE  # a plaintext client gets no answer


def test_bad_tls_settings_name_the_fields(engine_client: LocalEngineClient,
                                          tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path)

    async def start(**tls: str) -> None:
        server = await start_grpc_server(engine_client, free_port(), "127.0.0.1", **tls)
        await server.stop(None)

    with pytest.raises(ValueError, match="grpc_tls_cert_file and grpc_tls_key_file"):
        asyncio.run(start(tls_cert_file=str(cert)))
    with pytest.raises(ValueError, match="cannot read"):
        asyncio.run(start(tls_cert_file=str(cert), tls_key_file=str(tmp_path / "missing")))
