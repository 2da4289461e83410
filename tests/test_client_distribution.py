"""The `sealstream-client` distribution stands alone: built from client/ (an sdist, and a
wheel from that sdist) and installed into a clean virtual environment, it holds the client
and the message format and nothing of the server, pulls in none of the server's
dependencies, and talks to a live server, synchronously and with asyncio."""

import json
import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, Api
from tests.support.project import REPO

SERVER_SIDE = ("api", "sealstream", "services", "storage", "keystore", "workers", "cli")
SERVER_DEPENDENCIES = ("fastapi", "starlette", "uvicorn", "celery", "boto3", "click", "rich")

PROBE = """
import asyncio, importlib.util, io, json, os, sys
import envelope, sealstream_client
from sealstream_client import AsyncSealstreamClient, NotFound, SealstreamClient

url, token = os.environ["SEALSTREAM_URL"], os.environ["SEALSTREAM_TOKEN"]
client = SealstreamClient(url, token)
client.create_key(kid="alone", kty="oct", alg="AES-256")
sealed = io.BytesIO()
client.encrypt("alone", b"standing alone" * 1000, sealed)
opened = io.BytesIO()
client.decrypt(sealed.getvalue(), opened)

async def status() -> str:
    async with AsyncSealstreamClient(url, token) as aio:
        try:
            await aio.get_key("absent")
        except NotFound as refused:
            return refused.code
    return "found"

print(json.dumps({
    "files": [sealstream_client.__file__, envelope.__file__],
    "present": [name for name in sys.argv[1:] if importlib.util.find_spec(name)],
    "round_trip": opened.getvalue() == b"standing alone" * 1000,
    "async": asyncio.run(status()),
}))
"""


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_the_client_distribution_installs_and_works_alone(api: Api, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), "client"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        tops = {Path(name).parts[1] for name in archive.getnames() if len(Path(name).parts) > 2}
    assert {"sealstream_client", "envelope"} <= tops
    assert not tops & set(SERVER_SIDE)

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = str(environment / "bin" / "python")
    (wheel,) = dist.glob("*.whl")
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(wheel)],
        env=clean,
        check=True,
        capture_output=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"  # an empty directory: `python -c` imports from it
    elsewhere.mkdir()
    run = subprocess.run(
        [python, "-c", PROBE, *SERVER_SIDE, *SERVER_DEPENDENCIES],
        env={**clean, "SEALSTREAM_URL": api.url, "SEALSTREAM_TOKEN": ADMIN_TOKEN},
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(run.stdout)
    assert all(file.startswith(str(environment)) for file in report["files"]), report
    assert report["present"] == []
    assert report["round_trip"] is True
    assert report["async"] == "key-not-found"
