"""Whether a TCP port is free to listen on.

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
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
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
