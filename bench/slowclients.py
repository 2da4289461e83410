"""What a flood of slow clients costs the server, each figure next to its ceiling.

Starts `sealstream serve` (its own process, local-directory storage in a temporary
directory, short deadlines: `--header-timeout` and `--body-rate-window` of `--deadline`
seconds), creates a key, and warms the server up with one stream. Then, in one run:

1. at rest: the server's file descriptors and RSS, the baseline;
2. the flood: `--connections` connections, a third sending nothing, a third half a request
   line, a third a JSON body (under the size cap, so the app reads it) a byte every 0.2 s;
   the server's peak descriptors and RSS while it holds them (ceiling: the baseline plus
   one descriptor a connection), and the seconds until it has closed them all (ceiling:
   a trickling body fails within a rate window and a quarter, then the rest it left
   unread must keep the rate for a window);
3. a stream through the flood: a 256 MiB stream-back encrypt sent by curl while the
   flood is held, its MiB/s next to the same stream's on the server at rest (ratio).

Loopback only; every loop is bounded in count and time.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

from tests.support.ports import free_port

MiB = 1024 * 1024
TOKEN = "bench-admin-token-" + "x" * 24
KEYS = "/api/key-management/keys"
ENCRYPT = "/api/crypto/stream/encrypt"
TRICKLE_PAUSE = 0.2
GIVE_UP = 120.0  # seconds any wait of this bench may last


def wait_for(condition: Callable[[], bool], what: str) -> float:
    """Seconds until `condition` held; fails after `GIVE_UP`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > GIVE_UP:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def served(workdir: Path, deadline: float) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    env = {
        **os.environ,
        "SEALSTREAM_ADMIN_TOKEN": TOKEN,
        "SEALSTREAM_STORAGE_URL": f"file://{workdir / 'storage'}",
        "SEALSTREAM_HEADER_TIMEOUT": str(deadline),
        "SEALSTREAM_BODY_RATE_WINDOW": str(deadline),
    }
    command = [str(Path(sys.executable).with_name("sealstream")), "serve", "--port", str(port)]
    with (workdir / "server.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(url), "the server to start")
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def create_key(url: str) -> None:
    body = json.dumps({"kid": "benchKey", "kty": "oct", "alg": "AES-256"}).encode()
    request = urllib.request.Request(
        f"{url}{KEYS}",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 201


def stream_seconds(url: str, size: int) -> float:
    """A stream-back encrypt of `size` bytes through curl, from an anonymous in-memory
    file (so nothing touches disk), its output discarded; the seconds it took."""
    source = os.memfd_create("plaintext")
    block = os.urandom(MiB)
    for _ in range(size // MiB):
        os.write(source, block)
    command = [
        "curl", "-sS", "--fail", "-o", "/dev/null", "-X", "POST", f"{url}{ENCRYPT}",
        "-H", f"Authorization: Bearer {TOKEN}",
        "-F", 'metadata={"kid":"benchKey"};type=application/json',
        "-F", f"file=@/dev/fd/{source};type=application/octet-stream",
    ]  # fmt: skip
    try:
        start = time.monotonic()
        subprocess.run(command, check=True, pass_fds=(source,), timeout=GIVE_UP)
        return time.monotonic() - start
    finally:
        os.close(source)


class Peak:
    """The peak descriptors and RSS of a process, sampled every 20 ms until stopped."""

    def __init__(self, process: psutil.Process, busy_above: int) -> None:
        self.process = process
        self.busy_above = busy_above
        self.fds = self.rss = 0
        self.last_busy = time.monotonic()  # when it last held more than `busy_above`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(GIVE_UP)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with suppress(psutil.Error):
                fds = self.process.num_fds()
                self.fds = max(self.fds, fds)
                self.rss = max(self.rss, self.process.memory_info().rss)
                if fds > self.busy_above:
                    self.last_busy = time.monotonic()


def open_flood(url: str, count: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """`count` connections, and the third of them that trickle a body."""
    port = int(url.rsplit(":", 1)[1])
    socks = [socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP) for _ in range(count)]
    third = count // 3
    for sock in socks[third : 2 * third]:
        sock.sendall(b"POST /api/crypto/stream/encrypt HT")
    head = (
        f"POST {KEYS} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n{"
    ).encode()
    for sock in socks[2 * third :]:
        sock.sendall(head)
    return socks, socks[2 * third :]


def trickle(socks: list[socket.socket], stop: threading.Event) -> None:
    for _ in range(int(GIVE_UP / TRICKLE_PAUSE)):
        if stop.wait(TRICKLE_PAUSE):
            return
        for sock in socks:
            with suppress(OSError):
                sock.send(b" ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=600)
    parser.add_argument("--deadline", type=float, default=5.0)
    parser.add_argument("--stream-mib", type=int, default=256)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed")
    size = args.stream_mib * MiB
    with (
        tempfile.TemporaryDirectory() as workdir,
        served(Path(workdir), args.deadline) as (
            url,
            server,
        ),
    ):
        create_key(url)
        stream_seconds(url, 16 * MiB)  # warm-up: what any stream leaves behind
        at_rest = stream_seconds(url, size)
        time.sleep(1)
        idle_fds, idle_rss = server.num_fds(), server.memory_info().rss
        print(f"at rest: {idle_fds} descriptors, RSS {idle_rss / MiB:.1f} MiB")

        peak = Peak(server, busy_above=idle_fds + 4)
        stop = threading.Event()
        socks, trickling = open_flood(url, args.connections)
        sender = threading.Thread(target=trickle, args=(trickling, stop), daemon=True)
        sender.start()
        flooded_at = time.monotonic()
        try:
            wait_for(lambda: server.num_fds() >= args.connections, "the flood to be held")
            through_flood = stream_seconds(url, size)
            wait_for(lambda: server.num_fds() <= idle_fds + 4, "the flood to be closed")
            time.sleep(0.1)  # a sample past the last close
        finally:
            stop.set()
            sender.join(GIVE_UP)
            peak.stop()
            for sock in socks:
                sock.close()
    shed = peak.last_busy - flooded_at
    ceiling_fds = idle_fds + args.connections + 1  # and the stream's own
    print(
        f"flood of {args.connections}: peak {peak.fds} descriptors (ceiling {ceiling_fds}), "
        f"peak RSS {peak.rss / MiB:.1f} MiB ({(peak.rss - idle_rss) / MiB:+.1f} MiB over "
        "rest)"
    )
    print(
        f"all closed by the server {shed:.1f} s after they opened (ceiling: a body's rate "
        f"window and a quarter, then its unread rest's window, {2.25 * args.deadline:.1f} s)"
    )
    print(
        f"stream-back {args.stream_mib} MiB: {size / MiB / through_flood:.0f} MiB/s through the "
        f"flood vs {size / MiB / at_rest:.0f} MiB/s at rest, ratio {at_rest / through_flood:.2f}"
    )


if __name__ == "__main__":
    main()
