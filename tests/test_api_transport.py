"""Slow and hostile clients, through uvicorn over raw sockets: a connection that sends
nothing or half a request, headers without end, bodies that trickle (into a JSON route,
into storage, into a stream-back, or after the response has ended), and more connections
than a process may hold. Each is closed or refused in bounded time, and what its request
began is cleaned up."""

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from api.serving import MAX_HEAD_BYTES
from tests.conftest import ADMIN_TOKEN, Api, api_settings, live_api, local_settings
from tests.support.data import KiB, MiB, Tally, pieces, random_bytes
from tests.support.http import (
    ENCRYPT,
    FORM_TYPE,
    KEYS,
    auth,
    connect,
    create_key,
    exchange,
    form,
    form_bytes,
    part_head,
    request_head,
)
from tests.support.services import sealstream_serve
from tests.support.storage import nothing_stored
from tests.support.waiting import wait_until

HEADER_TIMEOUT = 1.0
RATE_WINDOW = 1.0
MIN_BODY_RATE = 1024
SOCKET_TIMEOUT = 30  # far past every deadline under test: reaching it fails the test
TRICKLE_PAUSE = 0.1
TRICKLE_BYTES = 300  # 30 s of trickling at most: far past the deadlines
STRICT = {
    "header_timeout": HEADER_TIMEOUT,
    "min_body_rate": MIN_BODY_RATE,
    "body_rate_window": RATE_WINDOW,
    "idle_timeout": SOCKET_TIMEOUT,  # so that only the rate can end a trickling body
}


@pytest.fixture(scope="module")
def strict_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A live API with short header and body-rate deadlines; the key `mySymKey` exists."""
    settings = local_settings(tmp_path_factory.mktemp("strict")).model_copy(update=STRICT)
    with live_api(settings) as api:
        with api.client() as client:
            create_key(client)
        yield api


def answer(sock: socket.socket, method: str = "POST") -> tuple[int, dict[str, Any]]:
    """The status and problem document the server answered on `sock`."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return response.status, json.loads(body) if body else {}


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (reading it gives EOF or a reset)."""
    try:
        while sock.recv(64 * KiB):
            pass  # what the server sent before it closed
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def trickle(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    """Send `data` a byte at a time, `TRICKLE_PAUSE` apart, until done, stopped or cut off."""
    with suppress(OSError):
        for byte in data:
            if stop.wait(TRICKLE_PAUSE):
                return
            sock.sendall(bytes([byte]))


@contextmanager
def trickling(sock: socket.socket, data: bytes) -> Iterator[None]:
    stop = threading.Event()
    sender = threading.Thread(target=trickle, args=(sock, data, stop), daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(SOCKET_TIMEOUT)


# The request line and headers


def test_a_connection_that_sends_nothing_is_closed(strict_api: Api) -> None:
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        assert closed_by_server(sock)


def test_half_a_request_line_gets_408_and_the_connection_closed(strict_api: Api) -> None:
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        sock.sendall(b"POST /api/crypto/stream/enc")
        status, document = answer(sock)
        assert (status, document["code"]) == (408, "header-timeout")
        assert closed_by_server(sock)


def test_headers_trickled_in_still_meet_one_deadline(strict_api: Api) -> None:
    """Each header comes well within the timeout, but the head as a whole does not."""
    headers = b"".join(b"X-Slow-%d: yes\r\n" % n for n in range(TRICKLE_BYTES))
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        with trickling(sock, headers):
            status, document = answer(sock, "GET")
    assert (status, document["code"]) == (408, "header-timeout")


def test_a_head_past_the_cap_gets_431(strict_api: Api) -> None:
    flood = b"X-Flood: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n"
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        with suppress(OSError):  # the server may close before it has all of it
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + flood)
        status, document = answer(sock, "GET")
    assert (status, document["code"]) == (431, "header-too-large")


def test_a_kept_alive_connection_has_the_same_deadline_for_its_next_request(
    strict_api: Api,
) -> None:
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        sock.sendall(request_head(strict_api.url, "/healthz", {}, method="GET"))
        assert answer(sock, "GET")[0] == 200
        sock.sendall(b"GET /healthz HT")
        status, document = answer(sock, "GET")
    assert (status, document["code"]) == (408, "header-timeout")


# Bodies that trickle


def test_a_trickled_json_body_gets_408(strict_api: Api) -> None:
    body = json.dumps({"kid": "slowKey", "kty": "oct", "padding": "x" * TRICKLE_BYTES}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        sock.sendall(request_head(strict_api.url, KEYS, {**headers, **auth(ADMIN_TOKEN)}))
        with trickling(sock, body):
            status, document = answer(sock)
    assert (status, document["code"]) == (408, "body-too-slow")


@pytest.fixture(params=["local", "s3"])
def strict_storage_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """`strict_api` on each storage backend, a server of the test's own."""
    settings = api_settings(request.param, tmp_path, request).model_copy(update=STRICT)
    with live_api(settings) as api:
        with api.client() as client:
            create_key(client)
        yield api


def test_an_upload_into_storage_that_trickles_gets_408_and_leaves_nothing(
    strict_storage_api: Api,
) -> None:
    api = strict_storage_api
    metadata = {"kid": "mySymKey", "destination": {"key": "slow/object.bin"}}
    head = form_bytes(metadata, None, terminated=False)
    head += b"\r\n" + part_head("file", "application/octet-stream", "slow.bin")
    headers = {"Content-Type": FORM_TYPE, "Content-Length": str(len(head) + 40 * MiB)}
    with connect(api.url, SOCKET_TIMEOUT) as sock:
        sock.sendall(request_head(api.url, ENCRYPT, {**headers, **auth(ADMIN_TOKEN)}) + head)
        for piece in pieces(random_bytes(10 * MiB, seed=7), 256 * KiB):
            sock.sendall(piece)
        wait_until(lambda: bool(api.objects.pending_uploads("tenants/")), "the upload to start")
        with trickling(sock, random_bytes(TRICKLE_BYTES, seed=8)):
            status, document = answer(sock)
    assert (status, document["code"]) == (408, "body-too-slow")
    wait_until(lambda: nothing_stored(api.objects), "the upload to be aborted")


def test_a_stream_back_that_trickles_is_cut_off(strict_api: Api) -> None:
    metadata = form_bytes({"kid": "mySymKey", "frameLength": 4096}, None, terminated=False)
    head = metadata + b"\r\n" + part_head("file", "application/octet-stream", "slow.bin")
    headers = {"Content-Type": FORM_TYPE, "Content-Length": str(len(head) + MiB)}
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        sock.sendall(request_head(strict_api.url, ENCRYPT, {**headers, **auth(ADMIN_TOKEN)}))
        sock.sendall(head + random_bytes(64 * KiB, seed=9))
        with trickling(sock, random_bytes(TRICKLE_BYTES, seed=10)):
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            assert response.status == 200
            with pytest.raises(http.client.IncompleteRead):
                response.read()


def test_a_body_the_app_left_unread_must_keep_coming(strict_api: Api) -> None:
    """A request refused before its body was read (here: no token) leaves the body to
    arrive after the response; trickled, it no longer holds the connection."""
    headers = {"Content-Type": "application/json", "Content-Length": str(10**9)}
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        sock.sendall(request_head(strict_api.url, KEYS, headers) + b"{")
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert response.status == 401
        response.read()
        with trickling(sock, b"x" * TRICKLE_BYTES):
            assert closed_by_server(sock)


# How many connections


def test_connections_past_the_cap_are_refused_until_one_closes(tmp_path: Path) -> None:
    cap = 5
    settings = local_settings(tmp_path).model_copy(
        update={"max_connections": cap, "header_timeout": SOCKET_TIMEOUT}
    )
    with live_api(settings) as api:
        held = [connect(api.url) for _ in range(cap)]
        try:
            with connect(api.url) as refused:
                status, document = answer(refused, "GET")
            assert (status, document["code"]) == (503, "too-many-connections")
            held.pop().close()

            def served() -> bool:
                with connect(api.url, SOCKET_TIMEOUT) as sock:
                    sock.sendall(request_head(api.url, "/healthz", {}, method="GET"))
                    return answer(sock, "GET")[0] == 200

            wait_until(served, "a connection to be served again")
        finally:
            for sock in held:
                sock.close()


def test_the_deadlines_leave_a_body_sent_at_full_speed_alone(strict_api: Api) -> None:
    """Backpressure: the app takes its time with a large body, and the client waits."""
    data = random_bytes(8 * MiB, seed=11)
    body = form_bytes({"kid": "mySymKey", "destination": {"key": "fast.bin"}}, data)
    headers = {"Content-Type": FORM_TYPE, "Content-Length": str(len(body))}
    with connect(strict_api.url, SOCKET_TIMEOUT) as sock:
        sock.sendall(request_head(strict_api.url, ENCRYPT, {**headers, **auth(ADMIN_TOKEN)}))
        sock.sendall(body)
        status, document = answer(sock)
    assert status == 201, document


# A flood of them, against a `sealstream serve` process

FLOOD_IDLE = 300  # connect and send nothing
FLOOD_HALF = 200  # half a request line
FLOOD_TRICKLING = 50  # a JSON body, a byte at a time
FLOOD = FLOOD_IDLE + FLOOD_HALF + FLOOD_TRICKLING
FLOOD_DEADLINE = 2.0
FLOOD_ROUNDS = 150  # of one byte to each trickling connection, 0.2 s apart: 30 s at most
FD_SLACK = 16  # storage files, threads' pipes and the like
RSS_CEILING = 64 * MiB  # over the baseline; the flood itself holds a few KiB a connection


class Sampler:
    """The peak file descriptors and RSS of a process, sampled until stopped."""

    def __init__(self, process: "psutil.Process") -> None:
        self.process = process
        self.fds = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(SOCKET_TIMEOUT)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.fds = max(self.fds, self.process.num_fds())
            self.rss = max(self.rss, self.process.memory_info().rss)


def open_flood(url: str) -> tuple[list[socket.socket], list[socket.socket]]:
    """Every connection of the flood, and those of them that trickle."""
    idle = [connect(url) for _ in range(FLOOD_IDLE)]
    half = [connect(url) for _ in range(FLOOD_HALF)]
    for sock in half:
        sock.sendall(b"POST /api/crypto/stream/encrypt HT")
    # Under the JSON size cap: the app reads these bodies (and then fails them as too slow).
    headers = {"Content-Type": "application/json", "Content-Length": str(60_000)}
    trickling = [connect(url) for _ in range(FLOOD_TRICKLING)]
    for sock in trickling:
        sock.sendall(request_head(url, KEYS, {**headers, **auth(ADMIN_TOKEN)}) + b"{")
    return idle + half + trickling, trickling


def trickle_all(socks: list[socket.socket], stop: threading.Event) -> None:
    for _ in range(FLOOD_ROUNDS):
        if stop.wait(0.2):
            return
        for sock in socks:
            with suppress(OSError):
                sock.send(b" ")


def test_a_flood_of_slow_connections_neither_stops_a_stream_nor_holds_the_server(
    tmp_path: Path,
) -> None:
    env = {
        "SEALSTREAM_ADMIN_TOKEN": ADMIN_TOKEN,
        "SEALSTREAM_HEADER_TIMEOUT": str(FLOOD_DEADLINE),
        "SEALSTREAM_BODY_RATE_WINDOW": str(FLOOD_DEADLINE),
        "SEALSTREAM_MAX_CONNECTIONS": str(2 * FLOOD),
    }
    plaintext = 32 * MiB
    with sealstream_serve(tmp_path, env) as served:
        server = psutil.Process(served.process.pid)
        with httpx.Client(base_url=served.url, headers=auth(ADMIN_TOKEN)) as client:
            create_key(client)
        # Warmed up by a first stream, so the baseline holds what any stream leaves behind.
        warm_up = exchange(served.url, ENCRYPT, form({"kid": "mySymKey"}, random_bytes(MiB)))
        assert warm_up.complete
        idle_fds, idle_rss = server.num_fds(), server.memory_info().rss
        stop = threading.Event()
        with Sampler(server) as peak:
            flood, trickling = open_flood(served.url)
            sender = threading.Thread(target=trickle_all, args=(trickling, stop), daemon=True)
            sender.start()
            try:
                wait_until(lambda: server.num_fds() >= FLOOD, "the flood to be held")
                sent = Tally()
                stream = exchange(
                    served.url,
                    ENCRYPT,
                    form({"kid": "mySymKey"}, sent.through(pieces_of(plaintext))),
                    keep_body=False,
                )
                assert stream.status == 200 and stream.complete and sent.size == plaintext
                wait_until(
                    lambda: server.num_fds() <= idle_fds + FD_SLACK,
                    "the server to close the flood",
                    timeout=SOCKET_TIMEOUT,
                )
                assert all(closed_by_server(sock) for sock in flood)
            finally:
                stop.set()
                sender.join(SOCKET_TIMEOUT)
                for sock in flood:
                    sock.close()
    assert peak.fds <= idle_fds + FLOOD + FD_SLACK, (idle_fds, peak.fds)
    assert peak.rss <= idle_rss + RSS_CEILING, (idle_rss, peak.rss)


def pieces_of(size: int) -> Iterator[bytes]:
    block = random_bytes(MiB, seed=12)
    for _ in range(size // MiB):
        yield block
