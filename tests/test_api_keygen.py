"""Costly key material work (RSA generation and import): a capacity of its own, off the
pool that authentication and key reads use, and a per-tenant rate limit answered with
`429 rate-limited` and a `Retry-After`."""

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from api.keygen import KeyWork
from api.problems import Problem
from sealstream.server import create_app
from sealstream.settings import Settings
from tests.conftest import ADMIN_TOKEN, local_settings
from tests.support.http import KEYS, problem
from tests.support.services import api_server
from tests.support.waiting import wait_until
from tests.test_api_stream_faults import with_default_threads

RATE = 4  # RSA keys a tenant may generate a minute
BURST = 6
RSA_4096 = {"kty": "RSA", "alg": "RSA-OAEP-256", "keySize": 4096, "keyOps": ["encrypt"]}
AES = {"kty": "oct", "alg": "AES-256", "keyOps": ["encrypt", "decrypt"]}


@pytest.fixture
def keygen_url(tmp_path: Path) -> Iterator[str]:
    """A live API whose default thread pool is cut to two threads (what a loaded server
    has left), generating one RSA key at a time, `RATE` a minute per tenant."""
    settings = local_settings(tmp_path).model_copy(
        update={"keygen_threads": 1, "keygen_rate": f"{RATE}/minute"}
    )
    app = with_default_threads(create_app(settings), 2)
    with api_server(app, settings=settings) as url:
        yield url


def token_for(url: str, tenant: str) -> str:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        issued = admin.post(
            "/api/admin/tokens", json={"tenant": tenant, "scopes": ["keys:read", "keys:write"]}
        )
    assert issued.status_code == 201, issued.text
    token: str = issued.json()["token"]
    return token


def client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def create(url: str, token: str, kid: str, spec: Mapping[str, object]) -> httpx.Response:
    with client(url, token) as tenant:
        return tenant.post(KEYS, json={"kid": kid, **spec})


def test_a_burst_of_rsa_keys_is_rate_limited_while_other_requests_still_answer(
    keygen_url: str,
) -> None:
    acme, beta = token_for(keygen_url, "acme"), token_for(keygen_url, "beta")
    assert create(keygen_url, acme, "small", AES).status_code == 201
    with ThreadPoolExecutor(BURST + 1) as pool:
        burst = [pool.submit(create, keygen_url, acme, f"big{n}", RSA_4096) for n in range(BURST)]

        def refused() -> int:
            return sum(f.done() and f.result().status_code == 429 for f in burst)

        wait_until(lambda: refused() == BURST - RATE, "the burst past the rate refused")
        # While the keys admitted are generated, one at a time, the rest still answers:
        # authentication, key reads and cheap keys of the same tenant and of another.
        with client(keygen_url, acme) as same, client(keygen_url, beta) as other:
            assert same.get(f"{KEYS}/small").status_code == 200
            assert same.get(KEYS).status_code == 200
            assert create(keygen_url, acme, "small2", AES).status_code == 201
            assert other.get(KEYS).json()["keys"] == []
            assert create(keygen_url, beta, "small", AES).status_code == 201
            answered_while_generating = not all(f.done() for f in burst)
            beta_rsa = pool.submit(create, keygen_url, beta, "big", RSA_4096)
        assert answered_while_generating, "the other requests waited for key generation"
        statuses = sorted(f.result().status_code for f in burst)
        assert beta_rsa.result().status_code == 201  # each tenant has a rate of its own
    assert statuses == [201] * RATE + [429] * (BURST - RATE)
    for response in (f.result() for f in burst):
        if response.status_code == 429:
            problem(response, 429, "rate-limited")
            assert 1 <= int(response.headers["Retry-After"]) <= 60
    created = next(f"big{n}" for n, f in enumerate(burst) if f.result().status_code == 201)
    with client(keygen_url, acme) as same:
        problem(same.post(f"{KEYS}/{created}/rotate"), 429, "rate-limited")  # rotation counts
        assert same.post(f"{KEYS}/small/rotate").status_code == 200  # AES does not


def test_costly_work_runs_at_most_threads_at_once_and_cheap_work_is_not_held() -> None:
    async def peak_of(kty: str, jobs: int) -> int:
        work = KeyWork(threads=2, rate="100/minute")
        lock, running, peak = threading.Lock(), [0], [0]

        def job() -> None:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.5)
            with lock:
                running[0] -= 1

        await asyncio.gather(*(work.run("tenant", kty, job) for _ in range(jobs)))
        return peak[0]

    assert asyncio.run(peak_of("RSA", 6)) <= 2
    assert asyncio.run(peak_of("oct", 6)) > 2


def test_the_rate_is_per_tenant() -> None:
    async def statuses() -> list[str]:
        work = KeyWork(threads=1, rate="1/minute")
        outcomes = []
        for tenant in ("acme", "acme", "beta"):
            try:
                await work.run(tenant, "RSA", lambda: None)
                outcomes.append(f"{tenant} ran")
            except Problem as refused:
                outcomes.append(f"{tenant} {refused.code}")
        return outcomes

    assert asyncio.run(statuses()) == ["acme ran", "acme rate-limited", "beta ran"]


def test_a_rate_that_does_not_parse_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="N/minute"):
        Settings(keygen_rate="often")
