"""A `sealstream serve` process whose file writes are reported by an audit hook, for the
tests that require plaintext never to touch disk."""

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ADMIN_TOKEN
from tests.support.ports import LOCALHOST, free_port
from tests.support.services import AWS_TEST_ENVIRONMENT, terminate
from tests.support.waiting import wait_until

AUDIT_HOOK = r"""
import os, sys

_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {
    "tempfile.mkstemp", "tempfile.mkdtemp", "os.truncate", "os.mkdir",
    "shutil.copyfile", "shutil.copytree", "shutil.move",
}

def _report(event, args):
    if event == "open":
        path, _, flags = args
        if isinstance(path, int) or not flags & _WRITE:
            return
    elif event == "mmap.__new__":
        if args[0] == -1:
            return
        path = f"<fd {args[0]}>"
    elif event in ("os.rename", "os.link", "os.symlink"):
        path = args[1]
    elif event in _PATH_EVENTS:
        path = args[0]
    else:
        return
    if not isinstance(path, str):
        path = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else repr(path)
    sys.__stderr__.write(f"AUDIT\t{event}\t{path}\n")
    sys.__stderr__.flush()

sys.addaudithook(_report)
from cli.main import main
main()
"""


@dataclass
class AuditedServer:
    """A `sealstream serve` process with the audit hook; `writes()` is what it wrote."""

    url: str
    process: "subprocess.Popen[str]"
    output: list[str]
    started_at: int  # index in `output` of the line that says the server is up

    def writes(self) -> list[tuple[str, str]]:
        """(event, path) of every write-like event after start-up."""
        found = []
        for line in self.output[self.started_at :]:
            if line.startswith("AUDIT\t"):
                _, event, path = line.split("\t", 2)
                found.append((event, path))
        return found


@contextmanager
def audited_serve(cwd: Path, env: Mapping[str, str]) -> Iterator[AuditedServer]:
    """`sealstream serve` (cli.main.main in a fresh interpreter) with an audit hook that
    reports to stderr every open for writing, temp file, rename and link; the output is
    drained by a thread, complete once the block exits (the process is stopped there)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", AUDIT_HOOK, "serve", "--port", str(port)],
        cwd=cwd,
        env={
            **os.environ,
            **AWS_TEST_ENVIRONMENT,
            "PYTHONDONTWRITEBYTECODE": "1",
            "SEALSTREAM_ADMIN_TOKEN": ADMIN_TOKEN,
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    up = threading.Event()

    def drain() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if "Uvicorn running on" in line:
                up.set()

    reader = threading.Thread(target=drain, name="audited-serve", daemon=True)
    reader.start()
    server = AuditedServer(f"http://{LOCALHOST}:{port}", process, output, 0)
    try:
        wait_until(lambda: up.is_set() or process.poll() is not None, "the server to start")
        if not up.is_set():
            raise RuntimeError("sealstream serve exited:\n" + "\n".join(output))
        server.started_at = next(i for i, line in enumerate(output) if "Uvicorn running" in line)
        yield server
    finally:
        terminate(process)
        reader.join(timeout=10)
        process.stdout.close()
