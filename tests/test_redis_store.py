"""L2 Redis store against a real redis-server: round trips, longest-prefix reads, TTLs, writes
that never block, and outages (killed, paused, wrong password) that degrade to misses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from zayaserve.replicas.kv_tiers.hashing import BlockHash, block_hashes, cache_namespace
from zayaserve.replicas.kv_tiers.redis_store import (
    CircuitBreaker,
    RedisBlockStore,
    TransferModel,
)

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
HASHES = block_hashes(list(range(6 * 4)), 4, cache_namespace("fp", 4, "none"))
PAYLOADS = [os.urandom(1000 + i) for i in range(len(HASHES))]
FAST = dict(timeout_s=0.2, breaker_failures=3, breaker_reset_s=0.3)
SLOW_RESET = dict(FAST, breaker_reset_s=1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on a free port; restartable on the same port."""

    def __init__(self, workdir: Path, *extra: str, password: str | None = None,
                 tls: bool = False) -> None:
        self.port, self.workdir, self.password = _free_port(), workdir, password
        self.tls = tls
        self.args = [REDIS_SERVER or "redis-server", "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(workdir), *extra]
        self.args += (["--port", "0", "--tls-port", str(self.port)] if tls
                      else ["--port", str(self.port)])
        if password:
            self.args += ["--requirepass", password]
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=1)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=self.workdir, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._ready():
            if self.proc.poll() is not None:
                if self.tls:
                    pytest.skip("this redis-server was built without TLS")
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def _ready(self) -> bool:
        if self.tls:  # the port being open is enough; the test itself speaks TLS
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it paused
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def server(tmp_path: Path):
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def auth_server(tmp_path: Path):
    srv = RedisServer(tmp_path, password="s3cret pass")
    srv.start()
    yield srv
    srv.stop()


def key(h: BlockHash) -> bytes:
    return b"zayaserve:kv:" + h.hex().encode()


@needs_redis
@pytest.mark.redis
def test_put_get_and_ttl(server: RedisServer) -> None:
    with RedisBlockStore(server.url(), ttl_s=60) as store:
        assert all(store.put_async(h, p) for h, p in zip(HASHES[:3], PAYLOADS, strict=False))
        assert store.flush()
        assert store.get_many(HASHES[:3]) == PAYLOADS[:3]
        raw = server.client()
        assert 0 < raw.ttl(key(HASHES[0])) <= 60
        raw.expire(key(HASHES[0]), 5)
        store.get_many(HASHES[:1])  # a hit keeps a hot block alive
        assert raw.ttl(key(HASHES[0])) > 5
        stats = store.stats
        assert (stats.writes, stats.hits, stats.misses) == (3, 4, 0)
        assert stats.bytes_written == sum(map(len, PAYLOADS[:3])) and stats.errors == 0
    with RedisBlockStore(server.url(), ttl_s=None) as store:
        store.put_async(HASHES[5], b"forever")
        assert store.flush()
        assert server.client().ttl(key(HASHES[5])) == -1  # no expiry


@needs_redis
@pytest.mark.redis
def test_reads_serve_the_longest_prefix(server: RedisServer) -> None:
    with RedisBlockStore(server.url()) as store:
        for i in (0, 1, 3, 4):  # block 2 is missing: 3 and 4 cannot be used
            store.put_async(HASHES[i], PAYLOADS[i])
        assert store.flush()
        assert store.get_many(HASHES[:5]) == [PAYLOADS[0], PAYLOADS[1], None]
        assert store.get_many(HASHES[:2]) == PAYLOADS[:2]
        assert store.get_many([HASHES[2], HASHES[0]]) == [None]
        assert store.get_many([]) == [] and store.contains_prefix([]) == 0
        assert store.contains_prefix(HASHES) == 2
        assert store.contains_prefix(HASHES[3:5]) == 2
        assert store.contains_prefix(HASHES[2:]) == 0
        stats = store.stats
        assert (stats.hits, stats.misses) == (4, 3 + 0 + 2)


@needs_redis
@pytest.mark.redis
def test_writes_never_block_on_a_stalled_server(server: RedisServer) -> None:
    # A long timeout keeps the writer stuck on its first SET for the whole burst.
    writer = RedisBlockStore(server.url(), write_queue=2, timeout_s=5.0)
    reader = RedisBlockStore(server.url(), timeout_s=0.3)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)  # accepts TCP, answers nothing
    try:
        assert writer.put_async(HASHES[0], PAYLOADS[0])
        time.sleep(0.1)  # the writer takes it and waits on the stalled server
        accepted = 0
        for i in range(40):
            start = time.perf_counter()
            accepted += writer.put_async(HASHES[i % len(HASHES)], PAYLOADS[0])
            assert time.perf_counter() - start < 0.05, f"put {i} blocked"
        assert accepted <= 3  # the queue holds 2 (3 if the writer was late to the first)
        assert writer.stats.writes_dropped == 40 - accepted
        start = time.perf_counter()
        assert reader.get_many(HASHES[:2]) == [None]  # a stalled read gives up at timeout_s
        assert time.perf_counter() - start < 0.3 + 0.5
        assert reader.stats.errors == 1
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert writer.flush(10.0)  # the stuck SET completes once the server runs again
    assert writer.stats.writes == 1 + accepted
    writer.close()
    reader.close()
    with RedisBlockStore(server.url(), write_queue_bytes=1500) as store:
        assert store.put_async(HASHES[0], PAYLOADS[0])  # 1000 bytes fit; three blocks do not
        assert sum(store.put_async(h, PAYLOADS[0]) for h in HASHES[1:4]) <= 2


@needs_redis
@pytest.mark.redis
def test_outage_opens_the_breaker_and_restart_recovers(server: RedisServer) -> None:
    # The reset is long enough that the checks below finish while the breaker is open.
    with RedisBlockStore(server.url(), **SLOW_RESET) as store:
        store.put_async(HASHES[0], PAYLOADS[0])
        assert store.flush() and store.get_many(HASHES[:1]) == PAYLOADS[:1]
        server.stop()  # killed: connections are refused
        for _ in range(3):
            start = time.perf_counter()
            assert store.get_many(HASHES[:2]) == [None]
            assert time.perf_counter() - start < 0.5
        assert store.stats.breaker_opens == 1 and store.stats.errors == 3
        assert not store.available
        for _ in range(20):  # open breaker: answers at once, the network is not touched
            start = time.perf_counter()
            assert store.get_many(HASHES[:2]) == [None]
            assert store.contains_prefix(HASHES) == 0
            assert store.put_async(HASHES[1], PAYLOADS[1]) is False
            assert time.perf_counter() - start < 0.05
        assert store.stats.errors == 3 and store.stats.writes_dropped == 20

        server.start()  # same port, empty (no persistence)
        time.sleep(SLOW_RESET["breaker_reset_s"])
        assert store.available
        assert store.get_many(HASHES[:1]) == [None]  # the half-open probe succeeds: a miss
        assert store.available and store.stats.breaker_opens == 1
        hits_before = store.stats.hits
        assert store.put_async(HASHES[0], PAYLOADS[0])
        assert store.flush() and store.get_many(HASHES[:1]) == PAYLOADS[:1]
        assert store.stats.hits == hits_before + 1


@needs_redis
@pytest.mark.redis
def test_auth_in_the_url(auth_server: RedisServer) -> None:
    for url in (auth_server.url("s3cret%20pass"),
                f"redis://default:s3cret%20pass@127.0.0.1:{auth_server.port}/0"):
        with RedisBlockStore(url) as store:
            assert store.put_async(HASHES[0], PAYLOADS[0]) and store.flush()
            assert store.get_many(HASHES[:1]) == PAYLOADS[:1]
    for url in (auth_server.url("wrong"), auth_server.url()):  # bad and missing password
        with RedisBlockStore(url, **SLOW_RESET) as store:
            for _ in range(4):
                assert store.get_many(HASHES[:1]) == [None]
                assert store.contains_prefix(HASHES[:1]) == 0
            store.put_async(HASHES[0], PAYLOADS[0])
            assert store.flush()
            stats = store.stats
            assert stats.errors == 3 and stats.breaker_opens == 1 and stats.hits == 0


@needs_redis
@pytest.mark.redis
def test_tls_url(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(keyfile), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    srv = RedisServer(tmp_path, "--tls-cert-file", str(cert), "--tls-key-file", str(keyfile),
                      "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                      password="pw", tls=True)
    srv.start()
    try:
        url = f"rediss://:pw@127.0.0.1:{srv.port}/0?ssl_ca_certs={cert}"
        with RedisBlockStore(url) as store:
            assert store.put_async(HASHES[0], PAYLOADS[0]) and store.flush()
            assert store.get_many(HASHES[:1]) == PAYLOADS[:1]
            assert store.stats.errors == 0
        plain = RedisBlockStore(srv.url("pw"), **FAST)  # plaintext to a TLS port: an error
        assert plain.get_many(HASHES[:1]) == [None] and plain.stats.errors == 1
        plain.close()
    finally:
        srv.stop()


def test_circuit_breaker_states() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=0.05)
    assert breaker.allow() and not breaker.failure()
    breaker.success()  # failures must be consecutive
    assert not breaker.failure() and breaker.failure()  # the second in a row opens it
    assert breaker.blocked() and not breaker.allow()
    time.sleep(0.06)
    assert not breaker.blocked()
    assert breaker.allow() and not breaker.allow()  # exactly one half-open probe
    assert breaker.failure() and breaker.blocked()  # a failed probe re-opens it
    time.sleep(0.06)
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.allow() and not breaker.blocked()


def test_transfer_model() -> None:
    fixed = TransferModel(bytes_per_s=1e9, rtt_s=1e-3)
    # 1 MB: 2 ms to fetch; recomputing 16 tokens at 4000 tok/s takes 4 ms, at 16000 tok/s 1 ms.
    assert fixed.should_fetch(16, 10**6, 4000.0)
    assert not fixed.should_fetch(16, 10**6, 16000.0)
    assert not fixed.should_fetch(0, 0, 1.0)
    with pytest.raises(ValueError):
        fixed.should_fetch(16, 10**6, 0.0)
    fixed.observe(10**6, 10.0)
    assert fixed.bytes_per_s == 1e9 and fixed.rtt_s == 1e-3  # overrides win
    measured = TransferModel()
    for _ in range(50):
        measured.observe(100, 0.002)  # small reads: round trips
        measured.observe(10**7, 0.102)  # 10 MB in 100 ms after the RTT
    assert measured.rtt_s == pytest.approx(0.002, rel=0.01)
    assert measured.bytes_per_s == pytest.approx(1e8, rel=0.01)
    assert measured.transfer_s(10**6) == pytest.approx(0.012, rel=0.02)
