"""`--workers N` and connections: the frontends share one REST port (a port of 0 is chosen
once, as the gRPC one), `--max-connections` holds for the whole server on it however the
kernel spreads the connections, and a frontend killed with connections open gives their
places back once it is started again. gRPC's count lives inside each frontend's gRPC core,
so each frontend holds its share of the limit there."""

from __future__ import annotations

import http.client
import os
import re
import signal
from pathlib import Path

import pytest

from ferry.server.call_counts import create_call_counts
from ferry.server.security import SecurityOptions
from tests.models import mlp_model, write_config
from tests.test_connection_limits import http_get, refused
from tests.waiting import wait_until
from tests.workers import Workers, established

REST_LINE = re.compile(r"REST binding on http://\S+:(\d+)")


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    write_config(tmp_path / "m", "max_batch_size: 4\n")
    return tmp_path


def rest_port(server: Workers, frontends: int = 2) -> int:
    announced = int(server.wait_for(r"; REST on port (\d+)")[0].group(1))
    bound = {int(m.group(1)) for m in server.wait_for(REST_LINE, frontends)}
    assert bound == {announced}, (bound, announced)
    return announced


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10)


def answers(connection: http.client.HTTPConnection) -> bool:
    try:
        return http_get(connection, "/v2/health/live") == 200
    except (ConnectionError, http.client.HTTPException, OSError):
        connection.close()
        return False


def test_the_frontends_share_one_rest_port_chosen_once(repository: Path) -> None:
    """Each frontend bound a port of its own for `--http-port 0`, so a client reached only
    one of them (and the announced port did not exist)."""
    server = Workers(repository, 2)
    try:
        port = rest_port(server)
        frontends = server.children()["frontend"]
        held = [connect(port) for _ in range(12)]
        for connection in held:
            assert answers(connection)
        by_frontend = [established(pid, port) for pid in frontends]
        assert sum(by_frontend) == 12, by_frontend
        for connection in held:
            connection.close()
        assert server.stop() == 0
    finally:
        server.close()


def test_the_rest_limit_holds_for_the_whole_server_and_a_killed_frontend_gives_back(
    repository: Path,
) -> None:
    """--max-connections 3 over two frontends: three connections fill the server wherever
    they land, five more are refused with the 503 that names the flag; one closed, one
    more is served. A frontend killed with `kill -9` while it holds connections: once it
    is back, its places are free again (exactly the others' remain taken)."""
    server = Workers(repository, 2, "--max-connections", "3")
    try:
        port = rest_port(server)
        held = [connect(port) for _ in range(3)]
        for connection in held:
            assert answers(connection)
        for _ in range(5):
            answer = refused(f"127.0.0.1:{port}")
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"--max-connections" in answer
        held.pop(0).close()
        late = connect(port)
        held.append(late)
        wait_until(lambda: answers(late), what="a new connection after one closed")

        frontends = server.children()["frontend"]
        holding = {pid: established(pid, port) for pid in frontends}
        victim = max(holding, key=lambda pid: holding[pid])
        assert holding[victim] >= 1, holding
        kept = 3 - holding[victim]
        os.kill(victim, signal.SIGKILL)
        server.wait_for("frontend process .* exited with -9; restarting it")
        server.wait_for(REST_LINE, 3)
        server.wait_for_frontends(1, after=2)
        alive = [c for c in held if answers(c)]
        assert len(alive) == kept, (len(alive), holding)
        fresh = []
        for _ in range(3 - kept):
            fresh.append(connect(port))
            assert answers(fresh[-1])
        answer = refused(f"127.0.0.1:{port}")
        assert answer.startswith(b"HTTP/1.1 503"), answer
        for connection in held + fresh:
            connection.close()
        assert server.stop() == 0
    finally:
        server.close()


def test_each_frontend_holds_its_share_of_the_grpc_limit() -> None:
    fd = create_call_counts(3)
    try:
        alone = SecurityOptions(max_connections=1000)
        shared = SecurityOptions(max_connections=1000, shared_connection_counts=(fd, 1))
        assert alone.frontend_max_connections == 1000
        assert shared.frontend_max_connections == 334  # 1000 / 3, rounded up
        options = dict(shared.connection_options(listeners=2))
        assert options["grpc.max_allowed_incoming_connections"] == 167
    finally:
        os.close(fd)
