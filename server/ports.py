"""Listening addresses: whether a TCP port is free, and a host as each listener takes it.

Ferry's gRPC listeners share their port through SO_REUSEPORT (see
`server.app.FerryServer`), and the kernel lets any later socket of the same user that sets
SO_REUSEPORT join such a port. So before binding, the port is claimed once without
SO_REUSEPORT, which fails while anything listens on it: a second server started on a taken
port fails its start instead of silently sharing the traffic.
"""

from __future__ import annotations

import errno
import socket


def port_is_free(host: str, port: int) -> bool:
    """False when something listens on host:port; port 0 is always free."""
    if port == 0:
        return True
    try:
        addresses = socket.getaddrinfo(
            bare_host(host) or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return True  # the bind itself will fail and say so
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC's own listener: connections of an earlier server in TIME_WAIT do
            # not make the port taken.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                # Other errors (an address family this host lacks) are the bind's to
                # report.
    return True


def bare_host(host: str) -> str:
    """The host as the socket API takes it: an IPv6 literal without brackets."""
    return host.strip("[]")


def socket_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def host_port(host: str, port: int) -> str:
    """host:port as gRPC parses it and URLs write it: an IPv6 literal in brackets,
    so that `--host ::` means every address, not a malformed name."""
    bare = bare_host(host)
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
