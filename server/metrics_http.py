"""The HTTP server behind the Prometheus endpoint: `/metrics` only (404 elsewhere), at most
a few connections at once (more are closed at once), and idle ones dropped after a
timeout, so that half-open connections cannot pile up threads."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .ports import bare_host, host_port, socket_family

MAX_CONNECTIONS = 16
IDLE_TIMEOUT_S = 10.0


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHttpServer

    def setup(self) -> None:
        super().setup()
        # A client silent this long is dropped (reads then raise TimeoutError).
        self.connection.settimeout(self.server.idle_timeout_s)

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, "Not Found", "Ferry serves Prometheus metrics at /metrics only")
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not worth a log line each


class MetricsHttpServer(HTTPServer):
    """One thread per connection, up to `max_connections`; a connection past that is
    closed at once."""

    daemon_threads = True
    request_queue_size = 128  # accepted fast; those past the limit are closed at once

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.address_family = socket_family(address[0])
        self.registry = registry
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        threading.Thread(
            target=self._serve, args=(request, client_address), daemon=True,
            name="ferry-metrics-connection",
        ).start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a broken connection is that client's problem
            pass
        finally:
            self.shutdown_request(request)
            self._slots.release()


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
