"""Channel settings both clients share: message limits, TLS credentials, call metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping

import grpc

DEFAULT_URL = "127.0.0.1:8001"

# gRPC refuses responses over 4 MiB by default; the server enforces its own size limit,
# so the client accepts whatever it sends back.
# gRPC's reconnect backoff grows to 120 s, and every call fails at once (UNAVAILABLE)
# while it lasts: after a 25 s restart of the server, a client failed for 16 s more.
# Capped at 1 s, a client works again within about a second of the server's return;
# an idle channel makes no attempts of its own, so the cap costs nothing while unused.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Past about 7e9 s, gRPC's deadline (nanoseconds since the epoch, in 64 bits) wraps
# around into the past and the call fails at once with DEADLINE_EXCEEDED; a timeout of
# more than 30 years is no deadline.
_NO_DEADLINE_AFTER_S = 1e9

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


def call_timeout(timeout: object) -> float | None:
    """`timeout` (seconds) as gRPC takes it: positive and finite, or None for no deadline.

    0, negative and NaN are refused rather than sent: gRPC fails such a call at once with
    DEADLINE_EXCEEDED, as if the server had been slow. inf means no deadline."""
    if timeout is None:
        return None
    wrong_type = TypeError(
        f"timeout={timeout!r}: give seconds as a number, or None for no deadline"
    )
    # True is 1 to Python; a str would fail deep inside grpc with "float + str".
    if isinstance(timeout, (bool, str, bytes, bytearray)) or not hasattr(timeout, "__float__"):
        raise wrong_type
    try:
        seconds = float(timeout)  # numpy's scalars and Decimal too
    except OverflowError:  # an int past float's range
        seconds = math.inf
    except (TypeError, ValueError):
        raise wrong_type from None
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(
            f"timeout={timeout!r}: give a positive number of seconds, or None for no deadline"
        )
    return None if seconds > _NO_DEADLINE_AFTER_S else seconds
