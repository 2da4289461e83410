"""How the served protocol reads request bodies (api.serving): in pieces larger than the
event loop's own reads, and whole and in order whichever way they arrive."""

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Iterator

from starlette.types import Receive, Scope, Send

from api.serving import RECEIVE_BUFFER_BYTES
from tests.support.ports import LOCALHOST
from tests.support.services import api_server

EVENT_LOOP_READ = 256 * 1024  # the most uvloop's (256,000 B) or asyncio's own read brings


class BodyRecorder:
    """An ASGI app that reads each request body slowly, so that the client gets ahead
    and the socket fills, and answers with the SHA-256 of what it read."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.chunks: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        digest = hashlib.sha256()
        more = True
        while more:
            await asyncio.sleep(self.pause)
            message = await receive()
            body = message.get("body", b"")
            self.chunks.append(len(body))
            digest.update(body)
            more = message.get("more_body", False)
        answer = digest.hexdigest().encode()
        headers = [(b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


def posted(url: str, pieces: Iterator[bytes], length: int, gap: float = 0.0) -> bytes:
    """POST the body `pieces` make up (`length` bytes), `gap` seconds apart; the answer's
    body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        head = f"POST / HTTP/1.1\r\nHost: {LOCALHOST}\r\nContent-Length: {length}\r\n\r\n"
        connection.sendall(head.encode())
        for piece in pieces:
            connection.sendall(piece)
            time.sleep(gap)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 64:
            received = connection.recv(65536)
            if not received:
                break
            answer += received
    return answer.split(b"\r\n\r\n", 1)[1]


def test_a_fast_body_is_read_in_pieces_larger_than_the_event_loops_own() -> None:
    body = os.urandom(4 * RECEIVE_BUFFER_BYTES)
    app = BodyRecorder(pause=0.02)
    with api_server(app) as url:
        pieces = (body[start : start + 65536] for start in range(0, len(body), 65536))
        answer = posted(url, pieces, len(body))
    assert answer == hashlib.sha256(body).hexdigest().encode()
    assert max(app.chunks) > EVENT_LOOP_READ, app.chunks
    assert max(app.chunks) <= RECEIVE_BUFFER_BYTES + 65536, app.chunks


def test_a_body_trickling_in_while_the_app_waits_arrives_whole_and_in_order() -> None:
    body = os.urandom(200 * 997)
    app = BodyRecorder(pause=0.2)  # pieces pile up before each read
    with api_server(app) as url:
        pieces = (body[start : start + 997] for start in range(0, len(body), 997))
        answer = posted(url, pieces, len(body), gap=0.002)
    assert answer == hashlib.sha256(body).hexdigest().encode()
    assert len(app.chunks) < 200  # pieces were joined: the piling-up path ran
