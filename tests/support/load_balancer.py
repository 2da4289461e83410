"""The load balancer of docker-compose.yml, `deploy/haproxy/haproxy.cfg`, made to run
outside Docker: the same file with Docker's DNS discovery replaced by explicit servers,
an address to listen on, and a stats socket to read the servers' states from."""

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.project import REPO

CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
RUNNING = "2"  # srv_op_state in `show servers state`


def haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        pytest.fail("haproxy is missing: apt-get install haproxy (or run `make system`)")
    return path


def local_config(bind: str, servers: list[str], stats: Path) -> str:
    """The compose file's configuration with Docker's DNS discovery replaced by the given
    servers (`address:port`), listening on `bind` (`address:port`), with a stats socket."""
    text = CONFIG.read_text()
    text = re.sub(r"\nresolvers docker\n(?:    .*\n)+", "\n", text)
    text = text.replace(" resolvers docker init-addr none", "")
    text = text.replace("bind :8443", f"bind {bind}")
    text = text.replace("global\n", f"global\n    stats socket {stats} mode 600 level admin\n", 1)
    lines = "".join(f"    server api{n} {address}\n" for n, address in enumerate(servers, 1))
    return re.sub(r"    server-template .*\n", lines, text)


def write_config(directory: Path, bind: str, servers: list[str]) -> tuple[Path, Path]:
    """`local_config` written to `directory` and checked by `haproxy -c`; the
    configuration file and the stats socket it names."""
    config, stats = directory / "haproxy.cfg", directory / "haproxy.sock"
    config.write_text(local_config(bind, servers, stats))
    check = subprocess.run([haproxy(), "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    return config, stats


def ask(stats: Path, command: str) -> str:
    """What HAProxy answers `command` on its stats socket."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(str(stats))
        connection.sendall(command.encode() + b"\n")
        return b"".join(iter(lambda: connection.recv(65536), b"")).decode()


def server_states(stats: Path) -> dict[str, str]:
    """Each API server's operational state (`RUNNING` when it takes traffic)."""
    rows = [line.split() for line in ask(stats, "show servers state api").splitlines()[2:]]
    return {row[3]: row[5] for row in rows if row}  # srv_name: srv_op_state


def server_sessions(stats: Path) -> dict[str, int]:
    """Each API server's current connections through the load balancer."""
    lines = ask(stats, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {
        row["svname"]: int(row["scur"] or 0)
        for row in rows
        if row["pxname"] == "api" and row["svname"] not in ("FRONTEND", "BACKEND")
    }
