"""`GET /metrics`: Prometheus text, no token needed, requests counted by route template and
status (aborted streams apart), body bytes both ways, and nothing confidential in it."""

from pathlib import Path

import httpx

from sealstream.server import create_app
from services.jobs import JobKind, JobStatus
from tests.conftest import ADMIN_TOKEN, live_api, local_settings
from tests.support.data import KiB, MiB, flip_bit, pieces, random_bytes
from tests.support.envelope import frame_offset
from tests.support.http import DECRYPT, ENCRYPT, create_key, encrypt, exchange, form
from tests.support.jobs import placeholder_job
from tests.support.metrics import scrape, value
from tests.support.ports import free_port
from tests.support.services import api_server

FRAME = 4096


def test_metrics_count_requests_by_route_template_and_body_bytes_both_ways(
    tmp_path: Path,
) -> None:
    data = random_bytes(3 * MiB + 5, seed=11)
    with live_api(local_settings(tmp_path)) as api, api.client() as client:
        create_key(client)
        client.get("/api/key-management/keys/mySymKey")
        client.get("/api/key-management/keys/no-such-key")
        client.get("/no/such/route")
        sealed = encrypt(client, data)
        assert sealed.status_code == 200
        response, samples = scrape(api.url)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    requests = "sealstream_http_requests_total"
    key_route = "/api/key-management/keys/{kid}"
    assert value(samples, requests, method="GET", route=key_route, status="200") == 1
    assert value(samples, requests, method="GET", route=key_route, status="404") == 1
    assert value(samples, requests, method="GET", route="unmatched", status="404") == 1
    assert value(samples, requests, method="POST", route=ENCRYPT, status="200") == 1
    # The form around the file part, in; the header and frames around the plaintext, out.
    received = value(samples, "sealstream_http_request_body_bytes_total", route=ENCRYPT)
    sent = value(samples, "sealstream_http_response_body_bytes_total", route=ENCRYPT)
    assert len(data) < received < len(data) + 2 * KiB
    assert sent == len(sealed.content)
    duration = "sealstream_http_request_duration_seconds_count"
    assert value(samples, duration, method="POST", route=ENCRYPT) == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    # Only the scrape itself is in progress while it is served.
    assert value(samples, "sealstream_http_requests_in_progress", method="GET") == 1


def test_an_aborted_stream_is_counted_apart_and_nothing_confidential_shows(
    tmp_path: Path,
) -> None:
    data = random_bytes(2 * MiB, seed=12)
    with live_api(local_settings(tmp_path)) as api, api.client() as client:
        create_key(client, kid="tenant-secret-kid")
        message = encrypt(client, data, kid="tenant-secret-kid", frameLength=FRAME).content
        tampered = flip_bit(message, frame_offset(message, 300) + 100)
        broken = exchange(api.url, DECRYPT, form({}, pieces(tampered, 64 * KiB)))
        assert broken.status == 200 and not broken.complete  # started, then cut off
        response, samples = scrape(api.url)

    requests = "sealstream_http_requests_total"
    assert value(samples, requests, method="POST", route=DECRYPT, status="aborted") == 1
    assert value(samples, requests, method="POST", route=DECRYPT, status="200") == 0
    for secret in ("tenant-secret-kid", ADMIN_TOKEN, "default"):
        assert secret not in response.text


def test_an_openmetrics_scraper_gets_openmetrics(tmp_path: Path) -> None:
    with live_api(local_settings(tmp_path)) as api:
        response = httpx.get(
            f"{api.url}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=30
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_jobs_running_and_finished_are_counted_and_a_job_store_that_cannot_answer_shows_down(
    tmp_path: Path,
) -> None:
    app = create_app(local_settings(tmp_path))
    jobs = app.state.services.jobs
    job = placeholder_job(JobKind.VERIFY, "default")
    with api_server(app) as url:
        _, idle = scrape(url)
        jobs.save(job.model_copy(update={"status": JobStatus.RUNNING}))
        _, busy = scrape(url)
        jobs.save(job.model_copy(update={"status": JobStatus.FAILED}))
        _, done = scrape(url)
    assert value(idle, "sealstream_job_store_up") == 1
    assert value(idle, "sealstream_jobs_running") == 0
    assert value(busy, "sealstream_jobs_running") == 1
    assert value(done, "sealstream_jobs_running") == 0
    finished = "sealstream_jobs_finished_total"
    assert value(busy, finished, kind="verify", status="failed") == 0
    assert value(done, finished, kind="verify", status="failed") == 1

    unreachable = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = local_settings(tmp_path / "b").model_copy(update={"redis_url": unreachable})
    with api_server(create_app(settings)) as url:
        response, down = scrape(url)
    assert response.status_code == 200
    assert value(down, "sealstream_job_store_up") == 0
    assert ("sealstream_jobs_running", frozenset()) not in down
