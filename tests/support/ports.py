"""Local ports: the loopback address the tests serve on, and a free port for a service that
must be told one (the benches use it too)."""

import socket

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on right now, for services that must be told a port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        port: int = probe.getsockname()[1]
        return port
