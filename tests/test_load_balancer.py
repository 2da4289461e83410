"""The load balancer of docker-compose.yml, `deploy/haproxy/haproxy.cfg`, run for real by
Debian's HAProxy in front of two HTTPS API servers on one store: streams pass through it
whole in both directions, its health check on /readyz works over TLS, and a server that
stops answering is taken out while the other carries on."""

import hashlib
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from sealstream.server import create_app
from tests.conftest import ADMIN_TOKEN, local_settings
from tests.support.data import MiB, random_bytes
from tests.support.http import KEYS
from tests.support.load_balancer import CONFIG, RUNNING, haproxy, server_states, write_config
from tests.support.ports import LOCALHOST, free_port
from tests.support.services import api_server, self_signed_certificate, terminate
from tests.support.waiting import wait_until


@contextmanager
def load_balancer(servers: list[str], directory: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    config, stats = write_config(directory, f"{LOCALHOST}:{port}", servers)
    process = subprocess.Popen([haproxy(), "-db", "-f", str(config)], stdout=subprocess.DEVNULL)
    try:
        wait_until(stats.exists, "haproxy's stats socket")
        yield f"https://{LOCALHOST}:{port}", stats
    finally:
        terminate(process)


def curl(url: str, path: str, ca: Path, *form: str) -> bytes:
    run = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--fail",
            "--cacert",
            str(ca),
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            *(f"-F{field}" for field in form),
            f"{url}{path}",
        ],
        capture_output=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_the_compose_configuration_is_valid() -> None:
    check = subprocess.run([haproxy(), "-c", "-f", str(CONFIG)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_streams_cross_the_load_balancer_and_a_stopped_server_is_taken_out(
    tmp_path: Path,
) -> None:
    settings = local_settings(tmp_path)
    certificate, _ = tls = self_signed_certificate(tmp_path)
    data = random_bytes(8 * MiB + 3, seed=5)
    plaintext = tmp_path / "plain.bin"
    plaintext.write_bytes(data)
    with ExitStack() as servers:
        first = servers.enter_context(api_server(create_app(settings), tls=tls))
        stopping = servers.enter_context(ExitStack())  # closed alone, to stop one server
        second = stopping.enter_context(api_server(create_app(settings), tls=tls))
        addresses = [url.removeprefix("https://") for url in (first, second)]
        with load_balancer(addresses, tmp_path) as (url, stats):
            wait_until(lambda: set(server_states(stats).values()) == {RUNNING}, "both servers up")
            with httpx.Client(
                base_url=url, verify=ssl.create_default_context(cafile=certificate)
            ) as client:
                key = {
                    "kid": "lb",
                    "kty": "oct",
                    "alg": "AES-256",
                    "keyOps": ["encrypt", "decrypt"],
                }
                created = client.post(
                    KEYS, json=key, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
                )
                assert created.status_code == 201

            sealed = curl(
                url,
                "/api/crypto/stream/encrypt",
                certificate,
                'metadata={"kid":"lb"};type=application/json',
                f"file=@{plaintext}",
            )
            ciphertext = tmp_path / "sealed.bin"
            ciphertext.write_bytes(sealed)
            opened = curl(
                url,
                "/api/crypto/stream/decrypt",
                certificate,
                "metadata={};type=application/json",
                f"file=@{ciphertext}",
            )
            assert hashlib.sha256(opened).digest() == hashlib.sha256(data).digest()

            stopping.close()  # the second server stops: its health checks fail
            wait_until(lambda: server_states(stats)["api2"] != RUNNING, "api2 taken out")
            assert server_states(stats)["api1"] == RUNNING
            for _ in range(4):  # every new stream goes to the server still up
                again = curl(
                    url,
                    "/api/crypto/stream/decrypt",
                    certificate,
                    "metadata={};type=application/json",
                    f"file=@{ciphertext}",
                )
                assert again == opened
