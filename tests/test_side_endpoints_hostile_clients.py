"""Hostile clients of the endpoints around inference: the gRPC health service, server
reflection and the Prometheus /metrics endpoint.

The tests drive a real server on 127.0.0.1 and an ephemeral port (a whole Ferry, or the
one service under test alone on a grpc.aio server, registered by its add_* function) and
assert what the client sees: the status code and message, and that no other caller is
held up or crowded out."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.reflection import SERVICE_NAME
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ferry.proto._pool import POOL
from ferry.server.healthcheck import HealthService, add_health_service
from ferry.server.metrics_http import MAX_CONNECTIONS, MetricsHttpServer
from ferry.server.reflection import ReflectionPool, add_reflection_service
from ferry.server.servicer import INFERENCE_SERVICE
from tests.conftest import RunningServer
from tests.models import mlp_model, write_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
STEP_S = 5.0  # a safety net for each awaited answer, never a wait in itself


# The health service -------------------------------------------------------------------


class HealthServer:
    """Ferry's health service alone on a grpc.aio server, and a channel to it."""

    def __init__(self, service: HealthService, server: grpc.aio.Server, port: int) -> None:
        self.service = service
        self.server = server
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = health_pb2_grpc.HealthStub(self.channel)


@pytest_asyncio.fixture
async def health() -> AsyncIterator[HealthServer]:
    service = HealthService()
    server = grpc.aio.server()
    add_health_service(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    running = HealthServer(service, server, port)
    yield running
    await running.channel.close()
    await server.stop(None)


def watch(health: HealthServer, service: str) -> grpc.aio.UnaryStreamCall:
    return health.stub.Watch(health_pb2.HealthCheckRequest(service=service))


async def next_status(call: grpc.aio.UnaryStreamCall) -> int:
    response = await asyncio.wait_for(call.read(), STEP_S)
    assert response is not grpc.aio.EOF, f"the Watch stream ended: {await call.code()}"
    return int(response.status)


@pytest.mark.asyncio
async def test_a_watcher_that_leaves_does_not_deafen_the_others(health: HealthServer) -> None:
    """grpcio-health-checking's servicer dropped the one condition all watchers of a
    service share when any of them left: the others never heard of a change again,
    NOT_SERVING at drain included."""
    staying, leaving = watch(health, ""), watch(health, "")
    assert await next_status(staying) == SERVING
    assert await next_status(leaving) == SERVING
    leaving.cancel()
    # A call after the cancel on the same connection: the server has seen the watcher
    # leave by the time it answers.
    check = health_pb2.HealthCheckRequest(service="")
    await health.stub.Check(check, timeout=STEP_S)

    await health.service.set("", NOT_SERVING)
    assert await next_status(staying) == NOT_SERVING
    await health.service.set("", SERVING)
    assert await next_status(staying) == SERVING
    await health.service.enter_graceful_shutdown()
    assert await next_status(staying) == NOT_SERVING
    staying.cancel()


@pytest.mark.asyncio
async def test_watch_on_an_unknown_service_says_so_and_follows_it(health: HealthServer) -> None:
    call = watch(health, "model-not-loaded-yet")
    assert await next_status(call) == SERVICE_UNKNOWN  # the stream goes on
    await health.service.set("model-not-loaded-yet", SERVING)
    assert await next_status(call) == SERVING
    call.cancel()


@pytest.mark.asyncio
async def test_check_of_an_unknown_service_names_it_and_what_is_known(
    health: HealthServer,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.stub.Check(health_pb2.HealthCheckRequest(service="no-such"), timeout=STEP_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown service 'no-such'" in (caught.value.details() or "")
    assert "each model's name" in (caught.value.details() or "")

    huge = "x" * 1_000_000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.stub.Check(health_pb2.HealthCheckRequest(service=huge), timeout=STEP_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(caught.value.details() or "") < 400  # quoted, but cut


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["Check", "Watch"])
async def test_a_health_request_that_is_not_protobuf_is_invalid_argument(
    health: HealthServer, method: str
) -> None:
    path = f"/grpc.health.v1.Health/{method}"
    not_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (service), two bytes that are not UTF-8
    if method == "Check":
        call = health.channel.unary_unary(path)(not_utf8, timeout=STEP_S)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    else:
        stream = health.channel.unary_stream(path)(not_utf8, timeout=STEP_S)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "request is not a valid HealthCheckRequest"


@pytest.mark.asyncio
async def test_a_model_gone_from_the_repository_is_not_left_serving(
    health: HealthServer,
) -> None:
    """The app set a status for each model the repository holds or that is loaded: a
    model removed from the repository (and so unloaded by --poll-repository) was named no
    more, and its health stayed SERVING while ModelReady said false."""
    await health.service.report({"": SERVING, "m": SERVING, "n": SERVING})
    watcher = watch(health, "n")
    assert await next_status(watcher) == SERVING
    await health.service.report({"": NOT_SERVING, "m": SERVING})  # "n" is gone
    assert await next_status(watcher) == NOT_SERVING
    check = await health.stub.Check(health_pb2.HealthCheckRequest(service="n"), timeout=STEP_S)
    assert check.status == NOT_SERVING
    await health.service.report({"": SERVING, "m": SERVING, "n": SERVING})  # it is back
    assert await next_status(watcher) == SERVING
    watcher.cancel()


class _StalledContext:
    """A Watch caller that never reads: its first write never completes."""

    def __init__(self) -> None:
        self.writing = asyncio.Event()

    async def write(self, message: object) -> None:
        self.writing.set()
        await asyncio.Event().wait()


@pytest.mark.asyncio
async def test_a_watcher_that_never_reads_holds_up_no_status_change() -> None:
    """grpcio-health-checking's servicer wrote to a watcher while holding the lock that
    every `set` takes: a watcher whose writes stall (flow control) held up model loads
    and the drain's NOT_SERVING."""
    service = HealthService()
    stalled = _StalledContext()
    watcher = asyncio.ensure_future(
        service.Watch(health_pb2.HealthCheckRequest(service=""), stalled)
    )
    try:
        await asyncio.wait_for(stalled.writing.wait(), STEP_S)
        await asyncio.wait_for(service.set("", NOT_SERVING), STEP_S)
        await asyncio.wait_for(service.enter_graceful_shutdown(), STEP_S)
    finally:
        watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher


# The /metrics endpoint ----------------------------------------------------------------


def _repository(root: Path) -> Path:
    mlp_model(root / "m" / "1" / "model.onnx")
    write_config(root / "m", "max_batch_size: 4\n")
    return root


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=STEP_S) as answer:
        assert answer.status == 200
        return bytes(answer.read())


def test_stalled_connections_cannot_lock_the_scraper_out(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    """Every connection slot held by a client that sends half a request line and stalls
    (or trickles a byte now and then, which no idle timeout catches): the scraper's
    connection was closed at once, for as long as the client kept it up."""
    server = start_server(_repository(tmp_path))
    port = server.server.metrics_port
    stalled = [
        socket.create_connection(("127.0.0.1", port), timeout=STEP_S)
        for _ in range(MAX_CONNECTIONS)
    ]
    try:
        for sock in stalled:
            sock.sendall(b"GET /metr")
        # Accepted in order: the scrape's connection comes after every stalled one.
        assert b"ferry_model_ready" in _scrape(port)
        # The scrape displaced the oldest stalled connection, which the server closed.
        assert stalled[0].recv(1024) == b""
        assert b"ferry_model_ready" in _scrape(port)
    finally:
        for sock in stalled:
            sock.close()


class _LargeCollector:
    """One sample whose label makes the exposition about `size` bytes long."""

    def __init__(self, size: int) -> None:
        self.label = "x" * size

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("large", "a long label", labels=["text"])
        family.add_metric([self.label], 1)
        yield family


class _LargeExposition:
    """A metrics server whose answer is far larger than the socket buffers, on a clock
    the test moves, and clients that ask for it and never read it."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        registry.register(_LargeCollector(8 * 1024 * 1024))  # type: ignore[arg-type]
        self.now = 0.0
        self.httpd = MetricsHttpServer(
            ("127.0.0.1", 0), registry, slow_reader_s=2.0, clock=lambda: self.now
        )
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.readers: list[socket.socket] = []

    def ask_and_never_read(self, source_host: str) -> None:
        sock = socket.socket()
        self.readers.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(STEP_S)
        sock.bind((source_host, 0))
        sock.connect(("127.0.0.1", self.httpd.server_port))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        # Being answered (a peek leaves the receive window shut).
        assert sock.recv(12, socket.MSG_PEEK) == b"HTTP/1.0 200"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for sock in self.readers:
            sock.close()


def _read_to_the_end(sock: socket.socket) -> bytes:
    received = []
    try:
        while chunk := sock.recv(1 << 20):
            received.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(received)


@pytest.fixture
def large_exposition() -> Iterator[_LargeExposition]:
    exposition = _LargeExposition()
    yield exposition
    exposition.close()


def test_clients_that_never_read_their_answer_cannot_lock_the_scraper_out(
    large_exposition: _LargeExposition,
) -> None:
    """Every connection slot held by clients (of several hosts, none past its share) that
    ask and never read an answer larger than the socket buffers: their writes blocked, and
    the scraper was refused for as long as they kept it up (reading a byte now and then)."""
    for index in range(MAX_CONNECTIONS):
        large_exposition.ask_and_never_read(f"127.0.0.{2 + index % 4}")
    port = large_exposition.httpd.server_port
    with pytest.raises(OSError):  # answers this recent are not cut short
        _scrape(port)
    large_exposition.now += 2.0
    assert _scrape(port).startswith(b"# HELP large")
    # The oldest reader was displaced: what it had been sent, and then the end.
    assert 0 < len(_read_to_the_end(large_exposition.readers[0])) < 8 * 1024 * 1024


def test_a_greedy_host_cannot_crowd_out_the_others(
    large_exposition: _LargeExposition,
) -> None:
    """One host holding every connection, each a scrape still being answered: another
    host's scrape was refused."""
    for _ in range(MAX_CONNECTIONS):
        large_exposition.ask_and_never_read("127.0.0.2")
    assert _scrape(large_exposition.httpd.server_port).startswith(b"# HELP large")


class _CountingCollector:
    """One sample: the number of times it was collected so far."""

    def __init__(self) -> None:
        self.collections = 0

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self.collections += 1
        family = CounterMetricFamily("scrape_collections", "times collected")
        family.add_metric([], self.collections)
        yield family


def test_a_scrape_storm_shares_renderings_and_each_scrape_is_fresh() -> None:
    """Eight connections scraping as fast as they can: each scrape rendered the registry
    on its own thread, holding the interpreter, and so the event loop that answers
    inference (measured: p50 inference latency 0.6 -> 6.5 ms under one client's storm)."""
    registry = CollectorRegistry()
    collector = _CountingCollector()
    registry.register(collector)  # type: ignore[arg-type]
    interval_s = 0.1
    httpd = MetricsHttpServer(("127.0.0.1", 0), registry, min_render_interval_s=interval_s)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    stale: list[tuple[float, float]] = []

    def scraper() -> None:
        for _ in range(5):
            asked_after = collector.collections
            text = _scrape(httpd.server_port).decode()
            (value,) = [
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("scrape_collections_total ")
            ]
            if value <= asked_after:  # rendered before this scrape asked
                stale.append((value, asked_after))

    started = time.monotonic()
    try:
        scrapers = [threading.Thread(target=scraper) for _ in range(8)]
        for each in scrapers:
            each.start()
        for each in scrapers:
            each.join(60)
        elapsed = time.monotonic() - started
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not stale
    assert collector.collections <= elapsed / interval_s + 1, (collector.collections, elapsed)
    assert httpd.exposition.renderings == collector.collections


# Server reflection --------------------------------------------------------------------

REFLECTION_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
Request = reflection_pb2.ServerReflectionRequest


@pytest_asyncio.fixture
async def reflection_channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    add_reflection_service(
        [INFERENCE_SERVICE, "grpc.health.v1.Health", SERVICE_NAME], server, ReflectionPool(POOL)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    await channel.close()
    await server.stop(None)


async def reflect(
    channel: grpc.aio.Channel, *requests: bytes
) -> list[reflection_pb2.ServerReflectionResponse]:
    """Each request's answer, all on one stream, read as they come."""
    call = channel.stream_stream(
        REFLECTION_INFO,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(timeout=STEP_S)
    answers = []
    for request in requests:
        await call.write(request)
        answers.append(await asyncio.wait_for(call.read(), STEP_S))
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    return answers


@pytest.mark.asyncio
async def test_a_malformed_reflection_request_fails_alone(
    reflection_channel: grpc.aio.Channel,
) -> None:
    """Bytes that are not a ServerReflectionRequest ended the whole stream with UNKNOWN
    ("Unexpected <class 'google.protobuf.message.DecodeError'>...")."""
    not_utf8 = b"\x22\x02\xff\xfe"  # file_containing_symbol, two bytes that are not UTF-8
    empty, bad, good = await reflect(
        reflection_channel,
        Request().SerializeToString(),
        not_utf8,
        Request(file_containing_symbol=f"{INFERENCE_SERVICE}.ModelInfer").SerializeToString(),
    )
    assert empty.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "must set one of file_by_filename, file_containing_symbol" in (
        empty.error_response.error_message
    )
    assert bad.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.error_response.error_message == "request is not a valid ServerReflectionRequest"
    assert good.file_descriptor_response.file_descriptor_proto  # the stream went on


@pytest.mark.asyncio
async def test_a_reflection_lookup_that_finds_nothing_names_what_was_asked(
    reflection_channel: grpc.aio.Channel,
) -> None:
    huge = "inference." + "x" * 100_000
    answers = await reflect(
        reflection_channel,
        Request(file_containing_symbol=f"{INFERENCE_SERVICE}.NoSuchMethod").SerializeToString(),
        Request(file_by_filename="../../etc/passwd").SerializeToString(),
        Request(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="inference.ModelInferRequest", extension_number=5
            )
        ).SerializeToString(),
        Request(all_extension_numbers_of_type="no.Such").SerializeToString(),
        Request(file_containing_symbol=huge).SerializeToString(),
    )
    messages = [answer.error_response.error_message for answer in answers]
    assert all(
        answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0] for answer in answers
    )
    assert messages[0].startswith(
        "no symbol 'inference.GRPCInferenceService.NoSuchMethod' is known to this server"
    )
    assert messages[1] == "no file '../../etc/passwd' is known to this server"
    assert messages[2] == (
        "no extension 5 of message type 'inference.ModelInferRequest' is known to this server"
    )
    assert messages[3] == "no message type 'no.Such' is known to this server"
    assert len(messages[4]) < 400  # the name is quoted, but cut
    # A list of the services, and a method's file, still come back as before.
    listed, method = await reflect(
        reflection_channel,
        Request(list_services="").SerializeToString(),
        Request(file_containing_symbol=f"{INFERENCE_SERVICE}.ModelInfer").SerializeToString(),
    )
    assert INFERENCE_SERVICE in {s.name for s in listed.list_services_response.service}
    assert method.file_descriptor_response.file_descriptor_proto


def test_a_model_removed_from_a_polled_repository_turns_not_serving_on_the_real_port(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    """The whole server: with --poll-repository, a model whose folder is deleted is
    unloaded, ModelReady turns false, and so must the model's health (Check and a Watch
    that was open), while the other model stays SERVING."""
    for name in ("m", "n"):
        mlp_model(tmp_path / name / "1" / "model.onnx", features=4)
        write_config(tmp_path / name, "max_batch_size: 8\n")
    server = start_server(tmp_path, poll_repository_s=3600.0)  # polled by hand below
    poller = server.server._poller
    assert poller is not None
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def status_of(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return int(stub.Check(request, timeout=STEP_S).status)

        assert status_of("n") == SERVING
        watcher = stub.Watch(health_pb2.HealthCheckRequest(service="n"), timeout=30)
        assert next(watcher).status == SERVING
        for path in sorted((tmp_path / "n").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (tmp_path / "n").rmdir()
        server.call(poller.poll_once())
        assert not server.server.manager.is_loaded("n")
        assert status_of("n") == NOT_SERVING
        assert next(watcher).status == NOT_SERVING
        assert status_of("m") == SERVING
        watcher.cancel()


def test_other_methods_on_metrics_get_405_and_head_gets_the_headers(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    """A method the endpoint knows but does not take is 405 with `Allow` (it was 501, "not
    implemented", which tells a client the server knows no such method); HEAD answers the
    headers of a GET, as HTTP asks of a server that serves GET."""
    server = start_server(_repository(tmp_path))
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        request = urllib.request.Request(url, data=b"" if method != "OPTIONS" else None,
                                         method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=STEP_S)
        caught.value.close()  # its connection
        assert caught.value.code == 405, method
        assert caught.value.headers["Allow"] == "GET, HEAD", method
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=STEP_S) as answer:
        assert answer.status == 200
        assert int(answer.headers["Content-Length"]) > 0
        assert answer.read() == b""
