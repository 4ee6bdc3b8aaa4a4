"""Channel settings both clients share."""

from __future__ import annotations

# gRPC refuses responses over 4 MiB by default; the server enforces its own size limit,
# so the client accepts whatever it sends back.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]

DEFAULT_URL = "127.0.0.1:8001"
