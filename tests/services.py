"""Throwaway real services for the tests: each helper starts one on a local port, yields
where to reach it, and stops it on the way out."""

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from moto.server import ThreadedMotoServer
from starlette.types import ASGIApp

LOCALHOST = "127.0.0.1"

# Dummy credentials for the moto server. The config files are hidden so that a developer's
# own ~/.aws profile (endpoint, retries, real credentials) cannot leak into a test run.
AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    """A TCP port nothing listens on right now, for services that must be told a port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto server speaking the AWS APIs over HTTP; yields its endpoint URL."""
    # Port 0: the server binds a port the kernel picks, so no other process can take it first.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    server = ThreadedMotoServer(ip_address=LOCALHOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def api_server(app: ASGIApp) -> Iterator[str]:
    """`app` served by uvicorn over real HTTP on a free local port; yields its base URL.

    uvicorn runs in a thread of the test process with logging left unconfigured, so
    its log records (access lines included) reach pytest's log capture.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOCALHOST, 0))  # bound here, so no other process can take the port
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{LOCALHOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


@dataclass
class ServeProcess:
    """A `sealstream serve` process and what it printed on the way up."""

    url: str
    admin_token: str
    process: "subprocess.Popen[str]"
    banner: list[str]


@contextmanager
def sealstream_serve(
    cwd: Path, env: dict[str, str] | None = None, *args: str
) -> Iterator[ServeProcess]:
    """`sealstream serve` started as its own process in `cwd`; stopped with SIGTERM."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("sealstream")), "serve", "--port", str(port)]
    process = subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    banner: list[str] = []
    try:
        for line in process.stdout:
            banner.append(line.rstrip("\n"))
            if "Uvicorn running on" in line:
                break
        else:
            raise RuntimeError("sealstream serve exited:\n" + "\n".join(banner))
        token = next(line.split(":", 1)[1].strip() for line in banner if "admin token:" in line)
        yield ServeProcess(f"http://{LOCALHOST}:{port}", token, process, banner)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
