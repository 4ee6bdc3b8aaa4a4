"""The HTTP server behind the Prometheus endpoint: `/metrics` only (404 elsewhere), at most
a few connections at once, and idle ones dropped after a timeout, so that half-open
connections cannot pile up threads.

A client cannot lock the scraper out or make the server spend its time rendering:
- when every connection is taken, a new one displaces the oldest of a host holding more
  than its share of them (a client scraping in a storm), else the oldest that has not yet
  sent its request (a stalled or trickling client), else the oldest still being answered
  after `slow_reader_s` (a client that does not read); it is refused only when every
  connection is a recent one being answered, to hosts holding their share or less;
- the registry is rendered at most once per `min_render_interval_s`, under one lock: a
  scrape is answered with the first rendering that began after its request arrived, so
  that it sees every change before it asked, and a storm of scrapes shares renderings
  instead of holding the interpreter (and so the event loop) with one rendering each.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .ports import bare_host, host_port, socket_family

MAX_CONNECTIONS = 16
IDLE_TIMEOUT_S = 10.0
# A rendering takes about 1 ms per loaded model; Prometheus scrapes every few seconds.
MIN_RENDER_INTERVAL_S = 0.05
# A connection open this long has had its answer long enough: a client that reads it
# this slowly (or not at all) may be displaced, like one that never sends its request.
SLOW_READER_S = 2.0
# One host may hold 1/HOSTS_SHARING of the connections at once; past that share, its own
# connections are displaced first, so that a greedy client cannot crowd out the others.
HOSTS_SHARING = 4
# A displaced connection's thread ends as soon as its read returns; this is a safety net.
DISPLACED_JOIN_TIMEOUT_S = 1.0


class Exposition:
    """The registry's text, rendered at most once per `min_interval_s`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        min_interval_s: float = MIN_RENDER_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._registry = registry
        self._min_interval_s = min_interval_s
        self.clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._body = b""
        self._started_at = -float("inf")  # when the rendering in _body began
        self.renderings = 0

    def body(self, asked_at: float) -> bytes:
        """A rendering that began at or after `asked_at` (on the clock)."""
        with self._lock:
            if self._started_at >= asked_at:
                return self._body  # rendered while this caller waited for the lock
            wait_s = self._started_at + self._min_interval_s - self.clock()
            if wait_s > 0:
                self._sleep(wait_s)
            self._started_at = self.clock()
            self._body = generate_latest(self._registry)
            self.renderings += 1
            return self._body


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHttpServer

    def setup(self) -> None:
        super().setup()
        # A client silent this long is dropped (reads then raise TimeoutError).
        self.connection.settimeout(self.server.idle_timeout_s)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        asked_at = self.server.exposition.clock()
        self.server.answering(self.connection)
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, "Not Found", "Ferry serves Prometheus metrics at /metrics only")
            return
        body = self.server.exposition.body(asked_at)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def _not_allowed(self) -> None:
        """A method HTTP knows that the endpoint does not take (http.server answers 501,
        which says the server knows no such method)."""
        self.server.answering(self.connection)
        self.send_response(405, "Method Not Allowed")
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not worth a log line each


class _Connection:
    __slots__ = ("answering", "host", "opened_at", "sock", "thread")

    def __init__(self, sock: socket.socket, host: str, opened_at: float) -> None:
        self.sock = sock
        self.host = host
        self.opened_at = opened_at
        self.answering = False  # its request has arrived
        self.thread: threading.Thread | None = None


class MetricsHttpServer(HTTPServer):
    """One thread per connection, up to `max_connections`; past that a new connection
    displaces another (see the module's docstring) or is closed at once."""

    daemon_threads = True
    request_queue_size = 128  # accepted fast; those past the limit are closed at once

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        min_render_interval_s: float = MIN_RENDER_INTERVAL_S,
        slow_reader_s: float = SLOW_READER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address_family = socket_family(address[0])
        self.registry = registry
        self.idle_timeout_s = idle_timeout_s
        self.exposition = Exposition(registry, min_render_interval_s)
        self._max_connections = max_connections
        self._slow_reader_s = slow_reader_s
        self._clock = clock
        self._lock = threading.Lock()
        # Open connections, oldest first. A connection's thread takes it out (under the
        # lock) before closing its socket, so one found here is never closed yet.
        self._open: list[_Connection] = []
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        connection = _Connection(request, host, self._clock())
        displaced: _Connection | None = None
        with self._lock:
            if len(self._open) >= self._max_connections:
                displaced = self._displaceable()
                if displaced is None:
                    self.shutdown_request(request)
                    return
                self._open.remove(displaced)
                # Its thread's read sees the end of the stream and the thread ends.
                try:
                    displaced.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._open.append(connection)
        if displaced is not None and displaced.thread is not None:
            # Never more threads than connections: the displaced one's ends first.
            displaced.thread.join(DISPLACED_JOIN_TIMEOUT_S)
        connection.thread = threading.Thread(
            target=self._serve,
            args=(connection, client_address),
            daemon=True,
            name="ferry-metrics-connection",
        )
        connection.thread.start()

    def _displaceable(self) -> _Connection | None:
        """The oldest connection of a host holding more than its share (waiting ones
        first), else the oldest still waiting for its request, else the oldest whose
        answer has taken longer than any scraper takes to read it."""
        held = Counter(c.host for c in self._open)
        if held:
            greedy, count = held.most_common(1)[0]
            if count > self._max_connections // HOSTS_SHARING:
                theirs = [c for c in self._open if c.host == greedy]
                return next((c for c in theirs if not c.answering), theirs[0])
        waiting = next((c for c in self._open if not c.answering), None)
        if waiting is not None:
            return waiting
        oldest = self._open[0] if self._open else None
        if oldest is not None and self._clock() - oldest.opened_at >= self._slow_reader_s:
            return oldest
        return None

    def answering(self, sock: socket.socket) -> None:
        """The request on `sock` has arrived: it is displaced only once it is slow."""
        with self._lock:
            for connection in self._open:
                if connection.sock is sock:
                    connection.answering = True

    def _serve(self, connection: _Connection, client_address: Any) -> None:
        try:
            self.finish_request(connection.sock, client_address)
        except Exception:  # a broken connection is that client's problem
            pass
        finally:
            with self._lock:
                if connection in self._open:
                    self._open.remove(connection)
            self.shutdown_request(connection.sock)


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[MetricsHttpServer, threading.Thread]:
    """Listen and serve on a daemon thread; raises OSError naming the address."""
    try:
        httpd = MetricsHttpServer((bare_host(host), port), registry)
    except OSError as exc:
        raise OSError(
            f"cannot listen on {host_port(host, port)} for metrics (--metrics-port): "
            f"{exc.strerror or exc}"
        ) from exc
    thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="ferry-metrics")
    thread.start()
    return httpd, thread
