"""A write's intent, put back with its object by someone who can write the bucket, after
the write was recorded and another written over it: the object's record says which
write is the latest, and the older one is refused, by reads and by the sweep alike,
while a read racing a write or a re-encryption still takes the newer intent."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.services import Services
from sealstream.server import create_app
from services.objects import read_stored_header
from services.unfinished import finish_recording
from storage import ObjectInfo, ObjectNotFound, ObjectStore
from storage.records import INTENTS_PREFIX, load_record, record_key, save_intent
from tests.conftest import ADMIN_TOKEN, Api, api_settings
from tests.support.data import random_bytes
from tests.support.http import ENCRYPT, create_key, post_form, problem, read_object
from tests.support.metrics import scrape, value
from tests.support.services import api_server

STORAGE_KEY = "tenants/default/doc"
REFUSED = "sealstream_records_refused_total"


class IntentCopier:
    """Someone who reads the bucket as it is written and keeps a copy of every intent."""

    def __init__(self, store: ObjectStore) -> None:
        self.copies: dict[str, bytes] = {}
        self._put = store.put

    def put(self, key: str, data: bytes, **conditions: Any) -> ObjectInfo:
        info = self._put(key, data, **conditions)
        if key.startswith(INTENTS_PREFIX):
            self.copies[key] = bytes(data)
        return info


@pytest.fixture(params=["local", "s3"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Api, Services]]:
    """A live API server (uvicorn over HTTP) on each backend, and its services (the sweep)."""
    settings = api_settings(request.param, tmp_path, request)
    app = create_app(settings)
    with api_server(app, settings=settings) as url:
        yield Api.of(url, settings, app), app.state.services


def store(client: httpx.Client, data: bytes, *, overwrite: bool = False) -> None:
    destination: dict[str, Any] = {"key": "doc"} | ({"overwrite": True} if overwrite else {})
    response = post_form(client, ENCRYPT, {"kid": "mySymKey", "destination": destination}, data)
    assert response.status_code == 201, response.text


def refused_intents(api: Api) -> float:
    return value(scrape(api.url)[1], REFUSED, kind="object-intent")


@pytest.mark.parametrize("then", ["overwritten", "deleted-then-written"])
def test_an_older_write_put_back_with_its_intent_is_refused_and_not_recorded(
    stack: tuple[Api, Services], monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    api, services = stack
    v0, v1, v2 = (random_bytes(40_000, seed=seed) for seed in (80, 81, 82))
    copier = IntentCopier(api.records.store)
    with api.client(ADMIN_TOKEN) as client:
        create_key(client)
        store(client, v0)  # so that v1's write is the second there, v2's (after a delete) first
        with monkeypatch.context() as spying:
            spying.setattr(api.records.store, "put", copier.put)
            store(client, v1, overwrite=True)
        (intent_name, intent), = copier.copies.items()  # fmt: skip
        old_object = api.objects.get(STORAGE_KEY)
        if then == "overwritten":
            store(client, v2, overwrite=True)
        else:
            assert client.delete("/api/objects/doc").status_code == 204
            store(client, v2)
        latest = load_record(api.records, api.objects.bucket, STORAGE_KEY)
        refused_before = refused_intents(api)

        api.objects.put(STORAGE_KEY, old_object)
        api.records.store.put(intent_name, intent)

        for range_ in (None, "bytes=0-99"):
            problem(read_object(client, "doc", range_), 502, "object-damaged")
        assert refused_intents(api) > refused_before
        assert finish_recording(services.records, services.keys, services.spaces) == 0
        assert load_record(api.records, api.objects.bucket, STORAGE_KEY) == latest
        assert list(api.records.store.list(INTENTS_PREFIX)) == []
        problem(read_object(client, "doc"), 502, "object-damaged")


@pytest.mark.parametrize("found", ["its-message", "its-header-on-other-bytes"])
def test_the_sweep_records_an_intents_object_only_once_read_back_as_its_message(
    stack: tuple[Api, Services], found: str
) -> None:
    """A writer lost between making its object visible and recording it leaves the
    intent: the sweep records the object it names once read back whole as that message.
    A bucket writer who puts the message's header (no secret) on other bytes of its size
    there gets nothing recorded, and the refusal is counted."""
    api, services = stack
    data = random_bytes(300_000, seed=90)
    with api.client(ADMIN_TOKEN) as client:
        create_key(client)
        store(client, data)
        record = load_record(api.records, api.objects.bucket, STORAGE_KEY)
        save_intent(api.records, record.model_copy(update={"etag": ""}))
        api.records.store.delete(record_key(api.objects.bucket, STORAGE_KEY))
        if found == "its-header-on-other-bytes":
            message = api.objects.get(STORAGE_KEY)
            header = len(read_stored_header(api.objects, STORAGE_KEY, len(message)).to_bytes())
            forged = message[:header] + random_bytes(len(message) - header, seed=91)
            api.objects.put(STORAGE_KEY, forged)
        refused_before = refused_intents(api)

        recorded = finish_recording(services.records, services.keys, services.spaces)

        if found == "its-message":
            assert recorded == 1
            saved = load_record(api.records, api.objects.bucket, STORAGE_KEY)
            assert (saved.header_sha256, saved.plaintext_sha256) == (
                record.header_sha256,
                record.plaintext_sha256,
            )
            assert read_object(client, "doc").content == data
        else:
            assert recorded == 0
            assert refused_intents(api) > refused_before
            with pytest.raises(ObjectNotFound):
                load_record(api.records, api.objects.bucket, STORAGE_KEY)
