"""Channel settings both clients share: message limits, TLS credentials, call metadata."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

DEFAULT_URL = "127.0.0.1:8001"

# gRPC refuses responses over 4 MiB by default; the server enforces its own size limit,
# so the client accepts whatever it sends back.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]

Metadata = tuple[tuple[str, str], ...]

# Schemes people carry over from REST clients and dashboards. gRPC would take them for a
# host name and fail each call with a resolver error; its own schemes (dns:, unix:,
# ipv4:, ...) pass through.
_NOT_GRPC_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")


def channel_target(url: str) -> str:
    """`url` as gRPC dials it: "host:port", or one of gRPC's own target forms."""
    for scheme in _NOT_GRPC_SCHEMES:
        if url.lower().startswith(scheme):
            hint = " (and tls=True for TLS)" if scheme in ("https://", "grpcs://") else ""
            raise ValueError(
                f"url {url!r}: give host:port without {scheme!r}, as "
                f"{url[len(scheme):].rstrip('/')!r}{hint}; the client speaks gRPC "
                "(Ferry's port 8001), not REST"
            )
    return url


def credentials(
    tls: bool,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plain text; any PEM argument turns TLS on."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("a client certificate needs both private_key and certificate_chain")
    if not (tls or root_certificates or private_key):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )


def call_metadata(headers: Mapping[str, str] | None) -> Metadata | None:
    """Headers sent with every call (an API key, say); gRPC wants lower-case keys."""
    if not headers:
        return None
    return tuple((key.lower(), value) for key, value in headers.items())
