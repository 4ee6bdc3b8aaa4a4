"""Start-ups that must fail, and fail by name: an empty repository under --exit-on-error,
and ports that cannot be bound. Each test proves the operator is told which flag to look
at, and that nothing is left listening."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.server.app import FerryServer, ServerOptions, StartupError, start_unless_stopped
from ferry.server.security import SecurityOptions, TlsFiles
from tests.certificates import Pki
from tests.models import mlp_model

# TEST-NET-1 (RFC 5737): never assigned to a local interface, so it cannot be bound.
UNBINDABLE_HOST = "192.0.2.1"


def options(model_path: Path, **overrides: object) -> ServerOptions:
    fields: dict[str, object] = {
        "host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "metrics_port": 0,
        "shutdown_grace_s": 1.0,
    }
    fields.update(overrides)
    return ServerOptions(model_path=model_path, **fields)  # type: ignore[arg-type]


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on for the whole test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    return tmp_path / "repo"


@pytest.mark.asyncio
async def test_exit_on_error_with_an_empty_repository_fails_the_start_and_closes_every_port(
    tmp_path: Path,
) -> None:
    """Outside explicit model control, a repository with nothing to serve fails the start
    with a StartupError naming the folder, and the gRPC, REST and metrics ports opened
    during the start are all closed again."""
    empty = tmp_path / "empty"
    empty.mkdir()
    server = FerryServer(options(empty, exit_on_error=True))
    with pytest.raises(StartupError) as caught:
        await server.start()
    assert str(caught.value).startswith(f"{empty} holds no model to serve")
    ports = (server.grpc_port, server.http_port, server.metrics_port)
    assert all(ports), ports  # every port was bound before the models loaded
    for port in ports:
        assert refuses_connections(port), f"port {port} still accepts connections"


@pytest.mark.asyncio
async def test_an_empty_repository_without_exit_on_error_serves_and_is_ready(
    tmp_path: Path,
) -> None:
    """The same empty repository with --exit-on-error=false starts: nothing failed, so
    the server is ready (with no model), as Triton's is."""
    empty = tmp_path / "empty"
    empty.mkdir()
    server = FerryServer(options(empty, exit_on_error=False, http_port=None, metrics_port=None))
    try:
        assert await server.start() > 0
        assert server.is_ready()
    finally:
        await server.stop(0.0)


@pytest.mark.asyncio
async def test_a_grpc_address_that_cannot_be_bound_fails_the_start_by_name(repo: Path) -> None:
    """With --reuse-port the free-port check is skipped and gRPC's own bind fails: its
    RuntimeError becomes an OSError naming the address and the flags to change."""
    server = FerryServer(options(repo, host=UNBINDABLE_HOST, reuse_port=True))
    with pytest.raises(OSError) as caught:
        await server.start()
    assert str(caught.value) == (
        f"cannot listen on {UNBINDABLE_HOST}:0 for gRPC (--host, --grpc-port): the address "
        "is in use or cannot be bound"
    )
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert server.grpc_port == 0


@pytest.mark.asyncio
async def test_a_grpc_port_in_use_fails_the_start_by_name(repo: Path, taken_port: int) -> None:
    """Without --reuse-port a taken gRPC port is found before gRPC binds it (gRPC itself
    would share it through SO_REUSEPORT): the start fails naming the address."""
    server = FerryServer(options(repo, grpc_port=taken_port))
    with pytest.raises(OSError) as caught:
        await server.start()
    assert str(caught.value) == (
        f"cannot listen on 127.0.0.1:{taken_port} for gRPC (--host, --grpc-port): the "
        "address is in use or cannot be bound"
    )


@pytest.mark.asyncio
async def test_a_rest_port_in_use_fails_the_start_by_name(repo: Path, taken_port: int) -> None:
    """A taken --http-port fails the start with an OSError naming the address, the flags
    and the system's reason; the models were not loaded yet, and a stop closes the gRPC
    port the start had opened."""
    server = FerryServer(options(repo, http_port=taken_port, metrics_port=None))
    try:
        with pytest.raises(OSError) as caught:
            await server.start()
        assert str(caught.value).startswith(
            f"cannot listen on 127.0.0.1:{taken_port} for REST (--host, --http-port): "
        )
        assert "Address already in use" in str(caught.value)
        assert server.manager.loaded() == []
    finally:
        await server.stop(0.0)
    assert refuses_connections(server.grpc_port)


@pytest.mark.asyncio
async def test_a_matching_tls_pair_starts(repo: Path, pki: Pki) -> None:
    """The control for the two tests below: the test CA's server identity starts (the
    gRPC port binds with it), so a refusal there is about the files alone."""
    tls = TlsFiles(pki.server.cert, pki.server.key)
    server = FerryServer(options(repo, http_port=None, metrics_port=None,
                                 security=SecurityOptions(tls=tls)))
    try:
        assert await server.start() > 0
    finally:
        await server.stop(0.0)


async def start_fails_naming_tls(repo: Path, tls: TlsFiles) -> None:
    """The start fails with a message about the TLS files, not about --host/--grpc-port."""
    server = FerryServer(options(repo, http_port=None, metrics_port=None,
                                 security=SecurityOptions(tls=tls)))
    with pytest.raises(OSError) as caught:
        await server.start()
    assert "TLS" in str(caught.value), str(caught.value)
    assert "--grpc-port" not in str(caught.value)


@pytest.mark.asyncio
async def test_tls_files_that_are_not_pem_fail_the_start_naming_tls(
    repo: Path, tmp_path: Path
) -> None:
    """A certificate and key that are not PEM fail the start with a message about the
    TLS files, not about --host/--grpc-port."""
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    await start_fails_naming_tls(repo, TlsFiles(tmp_path / "cert.pem", tmp_path / "key.pem"))


@pytest.mark.asyncio
async def test_a_certificate_with_another_identitys_key_fails_the_start_naming_tls(
    repo: Path, pki: Pki
) -> None:
    """The common slip: the server certificate with the client's key (both valid PEM,
    not a pair). The start must say the TLS files do not go together."""
    await start_fails_naming_tls(repo, TlsFiles(pki.server.cert, pki.client.key))


@pytest.mark.asyncio
async def test_a_stop_during_start_up_cancels_the_start() -> None:
    """start_unless_stopped (a signal while models load): the stop wins, the start is
    cancelled (it sees CancelledError) and None comes back."""
    started, cancelled = asyncio.Event(), asyncio.Event()
    stop = asyncio.Event()

    async def slow_start() -> int:
        started.set()
        try:
            await asyncio.Event().wait()  # a start that never ends by itself
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    outcome = asyncio.ensure_future(start_unless_stopped(slow_start(), stop))
    await started.wait()
    stop.set()
    assert await asyncio.wait_for(outcome, 5) is None
    assert cancelled.is_set()


@pytest.mark.asyncio
async def test_a_start_that_ends_first_is_returned_with_its_exception() -> None:
    """A start that fails before any stop comes back as its finished future, whose
    result() raises what the start raised (the CLI reports it and exits 1)."""

    async def failing_start() -> int:
        raise OSError("cannot listen")

    finished = await asyncio.wait_for(start_unless_stopped(failing_start(), asyncio.Event()), 5)
    assert finished is not None and finished.done()
    with pytest.raises(OSError, match="cannot listen"):
        finished.result()
