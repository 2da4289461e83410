"""A TCP proxy in front of a server that cuts connections: connection number k (from 0)
is closed, both ways, once `cuts[k]` bytes have gone from the client to the server;
connections past the list run whole. For tests of clients that must go on after a
dropped connection."""

import contextlib
import socket
import threading
from collections.abc import Sequence
from types import TracebackType
from urllib.parse import urlsplit

from tests.support.ports import LOCALHOST

BUFFER = 64 * 1024


class CuttingProxy:
    def __init__(self, upstream: str, cuts: Sequence[int]) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or LOCALHOST, parts.port or 80)
        self._cuts = list(cuts)
        self._listener = socket.create_server((LOCALHOST, 0))
        self.url = f"http://{LOCALHOST}:{self._listener.getsockname()[1]}"
        self.cut = 0  # connections cut so far
        self._connections = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def __enter__(self) -> "CuttingProxy":
        threading.Thread(target=self._accept, name="cutting-proxy", daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                number = self._connections
                self._connections += 1
            budget = self._cuts[number] if number < len(self._cuts) else None
            server = socket.create_connection(self._upstream)
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, budget, pair)).start()
            threading.Thread(target=self._pump, args=(server, client, None, pair)).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        budget: int | None,
        pair: tuple[socket.socket, socket.socket],
    ) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(BUFFER)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                if budget is not None and sent + len(data) >= budget:
                    sink.sendall(data[: budget - sent])
                    with self._lock:
                        self.cut += 1
                    for end in pair:
                        _close(end)
                    return
                sink.sendall(data)
                sent += len(data)
        except OSError:
            for end in pair:
                _close(end)


def _close(end: socket.socket) -> None:
    with contextlib.suppress(OSError):
        end.shutdown(socket.SHUT_RDWR)
    end.close()
