"""HTTP/1.1 over a bare socket, for tests that send what no client library would."""

from __future__ import annotations

import re
import socket


def connect(address: str, timeout: float = 30) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_answer(connection: socket.socket) -> tuple[bytes, bytes]:
    """The status and header lines, and the body, of one HTTP answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    wanted = int(length.group(1)) if length else 0
    while len(body) < wanted:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body
