"""The members an archive job seals are marked in the index of key versions by one marker
for the run, over real HTTP on both backends: the index lists, pages and counts them
member by member, follows them when they are re-encrypted, and a run cut short leaves a
marker that stands for what it sealed and for nothing else. A bucket writer without the
KEK can neither plant a run marker nor move one to another version."""

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from services import inventory
from services.archives.sealing import MemberSealing
from services.inventory import (
    RUN_MARKER_KIND,
    RUN_NAME_PREFIX,
    Inventory,
    Marker,
    RunIndex,
    RunMarker,
)
from services.inventory import version_prefix as index_prefix
from services.placement import Placement
from storage import ObjectExists, ObjectInfo, ObjectNotFound, ObjectStore
from storage.local import LocalStore
from storage.records import ObjectRecord, object_record, record_key
from tests.conftest import Api
from tests.support.data import random_bytes, tar_archive
from tests.support.http import FORM_TYPE, KEYS, create_key, encrypt, form_bytes, problem
from tests.support.jobs import finished_job

ARCHIVE = "/api/crypto/stream/encrypt-archive"
KID = "mySymKey"
TENANT = "default"
STORAGE_PREFIX = "tenants/default/"
MEMBERS = {f"m-{n}.bin": random_bytes(500 + 700 * n, seed=n) for n in range(5)}
LARGE = {"large.bin": random_bytes(5 * 1024 * 1024 + 1, seed=9)}  # no record in metadata


def stream_in(client: httpx.Client, members: dict[str, bytes], prefix: str = "out/") -> None:
    fields = {"kid": KID, "destination": {"prefix": prefix, "overwrite": True}}
    body = form_bytes(fields, tar_archive(members))
    response = client.post(ARCHIVE, content=body, headers={"Content-Type": FORM_TYPE})
    assert response.status_code == 200, response.text
    assert response.text.splitlines()[-1].find('"succeeded"') > 0, response.text


def streamed_run(api: Api, client: httpx.Client) -> str:
    """Stream `MEMBERS` in under a new key: the name of the run marker it leaves."""
    create_key(client)
    stream_in(client, MEMBERS)
    (run_name,) = index_names(api, 1)
    return index_prefix(TENANT, KID, 1) + run_name


def index_names(api: Api, version: int) -> list[str]:
    """The names of the index's records under `KID#version`, as stored."""
    prefix = index_prefix(TENANT, KID, version)
    return [info.key.removeprefix(prefix) for info in api.objects.list(prefix)]


def listed(client: httpx.Client, version: int, limit: int) -> list[str]:
    """Every key the index API lists under `KID#version`, page after page."""
    keys, unreadable = listed_and_unreadable(client, version, limit)
    assert unreadable == []
    return keys


def listed_and_unreadable(
    client: httpx.Client, version: int, limit: int
) -> tuple[list[str], list[dict[str, Any]]]:
    """Every key the index API lists under `KID#version`, page after page, and every run
    the pages name as passed over."""
    keys: list[str] = []
    unreadable: list[dict[str, Any]] = []
    query: dict[str, Any] = {"version": version, "limit": limit}
    for _ in range(50):
        response = client.get(f"{KEYS}/{KID}/objects", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        keys += [entry["key"] for entry in page["objects"]]
        unreadable += page["unreadable"]
        if page["next"] is None:
            return keys, unreadable
        query["after"] = page["next"]
    raise AssertionError("the pages never ended")


def object_counts(client: httpx.Client) -> dict[int, int]:
    view = client.get(f"{KEYS}/{KID}").json()
    return {version["version"]: version["objectCount"] for version in view["versions"]}


def test_a_run_is_marked_once_and_listed_member_by_member(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        stream_in(client, MEMBERS | LARGE)
        names = index_names(api, 1)
        runs = [name for name in names if name.startswith(RUN_NAME_PREFIX)]
        assert runs == names and len(runs) == 1  # the manifest is the run's too
        expected = sorted([f"out/{name}" for name in MEMBERS | LARGE] + ["out/manifest.json"])
        for limit in (1, 2, 100):
            assert sorted(listed(client, 1, limit)) == expected
        assert object_counts(client) == {1: len(expected)}
        # A cursor within a run that names no key of it still pages on; one that is not
        # a cursor, or names no place an object key could be, is refused.
        run = runs[0].removesuffix(".json")
        after: dict[str, Any] = {"version": 1, "after": f"{run}.{b'm-0.bim'.hex()}"}
        page = client.get(f"{KEYS}/{KID}/objects", params=after)
        assert page.status_code == 200, page.text
        assert page.json()["objects"][0]["key"] == "out/m-0.bin"
        for member in ("f", "00", "ff", "c3", "0a0d", "7f", b"/a".hex(), b"a//b".hex()):
            after["after"] = f"{run}.{member}"
            refused = client.get(f"{KEYS}/{KID}/objects", params=after)
            problem(refused, 422, "invalid-request")


def test_a_member_with_the_longest_key_is_paged_past(api: Api) -> None:
    """A member's cursor names its key under the run's prefix: one whose key has the most
    bytes an object key may have is paged past like any other."""
    if not isinstance(api.objects, LocalStore):
        pytest.skip("S3 holds keys of 1,024 bytes at most, the tenant's part with them")
    longest = "/".join(["a" * 199] * 6)[: 1024 - len("out/")]
    with api.client() as client:
        create_key(client)
        stream_in(client, {longest: b"long", "b": b"short"})
        expected = sorted([f"out/{longest}", "out/b", "out/manifest.json"])
        assert sorted(listed(client, 1, 1)) == expected


def test_a_member_over_an_object_marked_on_its_own_is_listed_once(api: Api) -> None:
    """The object replaced had a marker of its own, of the same version: the run's
    marker stands for the member, and the object's own is dropped."""
    with api.client() as client:
        create_key(client)
        small, large = next(iter(MEMBERS)), next(iter(LARGE))
        for name in (small, large):
            response = encrypt(client, b"before", destination={"key": f"out/{name}"})
            assert response.status_code == 201, response.text
        stream_in(client, MEMBERS | LARGE)
        assert [name[:4] for name in index_names(api, 1)] == [RUN_NAME_PREFIX]
        expected = sorted([f"out/{name}" for name in MEMBERS | LARGE] + ["out/manifest.json"])
        assert sorted(listed(client, 1, 100)) == expected
        assert object_counts(client) == {1: len(expected)}


def test_a_run_counts_its_members_once_ended_until_its_prefix_changes(api: Api) -> None:
    """Its marker notes how many objects it stands for, and the prefix's listing then:
    counting believes the figure while the listing is the same, and counts the members
    once anything under the prefix changed."""
    with api.client() as client:
        name = streamed_run(api, client)
        run = api.records.get(RUN_MARKER_KIND, name, RunMarker)
        assert run.members == len(MEMBERS) + 1 and run.listing is not None
        assert object_counts(client) == {1: len(MEMBERS) + 1}
        # The figure is what counts while the listing stands (here one put in by hand).
        api.records.put(RUN_MARKER_KIND, name, run.model_copy(update={"members": 99}))
        assert object_counts(client) == {1: 99}
        deleted = client.delete(f"/api/objects/out/{next(iter(MEMBERS))}")
        assert deleted.status_code == 204, deleted.text
        assert object_counts(client) == {1: len(MEMBERS)}
        assert len(listed(client, 1, 100)) == len(MEMBERS)


def test_a_broken_settlement_is_written_back_by_the_count_that_expands_it(api: Api) -> None:
    """A count that expands a run notes what it found, against the listing it found it
    in: the next count takes one listing again, and a later change under the prefix still
    breaks the figure."""
    with api.client() as client:
        name = streamed_run(api, client)
        settled = api.records.get(RUN_MARKER_KIND, name, RunMarker)
        written = encrypt(client, b"not the run's", destination={"key": "out/other.bin"})
        assert written.status_code == 201, written.text
        assert object_counts(client) == {1: len(MEMBERS) + 2}  # the encrypt's own marker
        rewritten = api.records.get(RUN_MARKER_KIND, name, RunMarker)
        assert rewritten.members == len(MEMBERS) + 1
        assert rewritten.listing not in (None, settled.listing)
        deleted = client.delete(f"/api/objects/out/{next(iter(MEMBERS))}")
        assert deleted.status_code == 204, deleted.text
        assert object_counts(client) == {1: len(MEMBERS) + 1}
        noted = api.records.get(RUN_MARKER_KIND, name, RunMarker)
        assert noted.members == len(MEMBERS)
        # An object with no record may be a write not recorded yet: no figure is noted
        # over it, the run is expanded until it has one (or is gone).
        api.objects.put(f"{STORAGE_PREFIX}out/unrecorded.bin", b"no record")
        assert object_counts(client) == {1: len(MEMBERS) + 1}
        assert api.records.get(RUN_MARKER_KIND, name, RunMarker) == noted


def test_members_sealed_into_the_whole_space_are_marked_one_by_one(api: Api) -> None:
    """A run into '' would be settled against every object the tenant has, broken by any
    write anywhere: its members get markers of their own instead, and a later write
    costs no expansion."""
    with api.client() as client:
        create_key(client)
        stream_in(client, MEMBERS, prefix="")
        names = index_names(api, 1)
        assert len(names) == len(MEMBERS) + 1
        assert not [name for name in names if name.startswith(RUN_NAME_PREFIX)]
        written = encrypt(client, b"elsewhere", destination={"key": "other.bin"})
        assert written.status_code == 201, written.text
        assert object_counts(client) == {1: len(MEMBERS) + 2}
        expected = sorted([*MEMBERS, "manifest.json", "other.bin"])
        assert sorted(listed(client, 1, 2)) == expected


def test_members_re_encrypted_leave_their_version_and_it_can_be_retired(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        stream_in(client, MEMBERS)
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        retire = {"confirm": f"{KID}#1"}
        refused = client.post(f"{KEYS}/{KID}/versions/1/retire", json=retire)
        assert problem(refused, 409, "version-in-use")["objectCount"] == len(MEMBERS) + 1
        job = client.post("/api/jobs/reencrypt", json={"kid": KID, "version": 1})
        assert finished_job(client, job.json()["id"], timeout=120)["status"] == "succeeded"
        assert listed(client, 1, 100) == []
        assert len(listed(client, 2, 100)) == len(MEMBERS) + 1
        assert object_counts(client) == {1: 0, 2: len(MEMBERS) + 1}
        retired = client.post(f"{KEYS}/{KID}/versions/1/retire", json=retire)
        assert retired.status_code == 200, retired.text


def test_a_run_cut_short_stands_for_what_it_sealed_and_nothing_else(api: Api) -> None:
    """Its marker is written before its first member is made visible; one whose writing
    fails then is not listed, and the marker lists only the members sealed, only under
    its own prefix, where another job's objects are listed by their own run's."""
    with api.client() as client:
        create_key(client)
        store = api.parts.spaces.store(TENANT, None)
        run = RunIndex(api.records, TENANT, store.bucket, f"{STORAGE_PREFIX}run/", "job-1")
        sealing = MemberSealing(
            api.parts.keys, api.records, TENANT, KID, {}, 4096, job_id="job-1", run=run
        )

        def place(key: str) -> Placement:
            return Placement(store, store.bucket, key, STORAGE_PREFIX + key)

        stream_in(client, {"a": b"a" * 100}, prefix="run/")  # another job's
        theirs = ["run/a", "run/manifest.json"]
        with pytest.raises(ObjectExists):  # once the run is marked
            sealing.seal(place("run/a"), [b"a" * 100], overwrite=False, after_chunk=lambda: None)
        assert len([n for n in index_names(api, 1) if n.startswith(RUN_NAME_PREFIX)]) == 2
        assert sorted(listed(client, 1, 100)) == theirs and object_counts(client) == {1: 2}
        sealing.seal(place("run/b"), [b"b" * 100], overwrite=False, after_chunk=lambda: None)
        assert sorted(listed(client, 1, 100)) == sorted([*theirs, "run/b"])
        assert object_counts(client) == {1: 3}
        with pytest.raises(ValueError, match="prefix"):
            sealing.seal(place("elsewhere"), [b"d"], overwrite=False, after_chunk=lambda: None)
        with pytest.raises(ObjectNotFound):
            store.head(STORAGE_PREFIX + "elsewhere")


def test_a_run_marker_planted_or_moved_is_not_believed(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        stream_in(client, MEMBERS)
        (run,) = [name for name in index_names(api, 2) if name.startswith(RUN_NAME_PREFIX)]
        sealed = api.objects.get(index_prefix(TENANT, KID, 2) + run)
        # Moved to version 1's name, it would stand for the members there: refused.
        api.objects.put(index_prefix(TENANT, KID, 1) + run, sealed)
        planted = f"{RUN_NAME_PREFIX}{'0' * 64}.json"
        api.objects.put(index_prefix(TENANT, KID, 1) + planted, b'{"kind": "run-marker"}')
        assert listed(client, 1, 100) == []
        assert object_counts(client) == {1: 0, 2: len(MEMBERS) + 1}


def test_a_plain_write_racing_a_member_over_its_key_stays_in_the_index(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain encryption of out/k, of the same key version as the object there, holds
    after its marker while an archive member is written over out/k and drops that
    object's marker, which is the plain write's too (markers are named by place and
    version); the plain write then completes: its object is listed and counted."""
    with api.client() as client:
        create_key(client)
        overwrite = {"key": "out/k", "overwrite": True}
        assert encrypt(client, b"X", destination=overwrite).status_code == 201
        held, go = threading.Event(), threading.Event()
        add = Inventory.add

        def add_then_hold(inventory: Inventory, marker: Marker) -> bool:
            wrote = add(inventory, marker)
            if marker.storage_key.endswith("out/k") and not held.is_set():
                held.set()
                go.wait(30)
            return wrote

        monkeypatch.setattr(Inventory, "add", add_then_hold)
        answers: list[httpx.Response] = []

        def plain_write() -> None:
            with api.client() as other:
                answers.append(encrypt(other, b"Y" * 10, destination=overwrite))

        writer = threading.Thread(target=plain_write)
        writer.start()
        assert held.wait(30)
        stream_in(client, {"k": b"member"})
        go.set()
        writer.join(30)
        assert answers[0].status_code == 201, answers[0].text
        assert sorted(listed(client, 1, 100)) == ["out/k", "out/manifest.json"]
        assert object_counts(client) == {1: 2}


class Requests:
    """The listings of one prefix a store is asked for, and the records of listed objects
    the index reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: ObjectStore, prefix: str) -> None:
        self.listings = self.records = 0
        listing, read = store.list, object_record

        def counted_list(under: str, **options: Any) -> Iterator[ObjectInfo]:
            self.listings += under == prefix
            return listing(under, **options)

        def counted_read(*args: Any) -> ObjectRecord:
            self.records += 1
            return read(*args)

        monkeypatch.setattr(store, "list", counted_list)
        monkeypatch.setattr(inventory, "object_record", counted_read)

    def taken(self) -> tuple[int, int]:
        """(listings, records read) since the last call."""
        taken = (self.listings, self.records)
        self.listings = self.records = 0
        return taken


def test_runs_into_one_prefix_share_its_listing_and_its_records(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three archives into out/, then a write there: a count lists out/ once, and reads
    each object's record once, not once for each run; the count after takes that one
    listing. A listing of the version reads each record once too."""
    runs = [
        {f"r{run}-{n}": random_bytes(300 + n, seed=10 * run + n) for n in range(2)}
        for run in range(3)
    ]
    with api.client() as client:
        create_key(client)
        for members in runs:
            stream_in(client, members)
        written = encrypt(client, b"not a run's", destination={"key": "out/other.bin"})
        assert written.status_code == 201, written.text
        requests = Requests(monkeypatch, api.objects, f"{STORAGE_PREFIX}out/")
        objects = 3 * 2 + 2  # the members, the last manifest, other.bin
        assert object_counts(client) == {1: objects}  # other.bin marked on its own
        assert requests.taken() == (1, objects)
        assert object_counts(client) == {1: objects}
        assert requests.taken() == (1, 0)
        # Listed, each run lists the prefix; each object's record is read once.
        assert len(listed(client, 1, 100)) == objects
        assert requests.taken() == (3, objects)


def test_a_record_file_of_what_a_member_replaced_fixes_no_figure(api: Api) -> None:
    """A large member written over a plain encryption's object, its own record file not
    saved yet: the other's, left there, names no job. A count then fixes no figure on
    it, and once the member's record is there it is counted."""
    if isinstance(api.objects, LocalStore):
        pytest.skip("on a local directory every object carries its record, whatever its size")
    (name, data), key = next(iter(LARGE.items())), f"out/{next(iter(LARGE))}"
    with api.client() as client:
        create_key(client)
        assert encrypt(client, data, destination={"key": key}).status_code == 201
        record_file = record_key(api.objects.bucket, STORAGE_PREFIX + key)
        plain = api.objects.get(record_file)
        stream_in(client, {name: data})
        (run_name,) = index_names(api, 1)
        member = api.objects.get(record_file)
        api.objects.put(record_file, plain)  # as between the member's upload and record
        written = encrypt(client, b"not the run's", destination={"key": "out/other.bin"})
        assert written.status_code == 201, written.text
        assert object_counts(client) == {1: 2}  # the member, unrecorded, not counted yet
        api.objects.put(record_file, member)
        assert object_counts(client) == {1: 3}
        name = index_prefix(TENANT, KID, 1) + run_name
        assert api.records.get(RUN_MARKER_KIND, name, RunMarker).members == 2


def test_a_run_ending_beside_an_unrecorded_object_fixes_no_figure(api: Api) -> None:
    """An object under the prefix without a record may be a write not recorded yet
    (perhaps another attempt's member): the run's end notes no figure over it, and the
    count that expands it notes none either."""
    api.objects.put(f"{STORAGE_PREFIX}out/unrecorded.bin", b"no record")
    with api.client() as client:
        name = streamed_run(api, client)
        assert api.records.get(RUN_MARKER_KIND, name, RunMarker).members is None
        assert object_counts(client) == {1: len(MEMBERS) + 1}
        assert api.records.get(RUN_MARKER_KIND, name, RunMarker).members is None


def test_a_count_leaves_a_settlement_written_meanwhile(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a count expands a run, another settles it: the count's figure is not
    written over that one."""
    with api.client() as client:
        name = streamed_run(api, client)
        written = encrypt(client, b"not the run's", destination={"key": "out/other.bin"})
        assert written.status_code == 201, written.text
        meanwhile = api.records.get(RUN_MARKER_KIND, name, RunMarker).model_copy(
            update={"members": 42, "listing": "0" * 64}
        )
        tally = inventory._tally

        def settled_meanwhile(*args: Any) -> tuple[list[int], bool]:
            api.records.put(RUN_MARKER_KIND, name, meanwhile)
            return tally(*args)

        monkeypatch.setattr(inventory, "_tally", settled_meanwhile)
        assert object_counts(client) == {1: len(MEMBERS) + 2}
        assert api.records.get(RUN_MARKER_KIND, name, RunMarker) == meanwhile


def test_a_page_passes_over_a_run_whose_bucket_cannot_be_read_and_says_so(api: Api) -> None:
    """A run in a bucket that cannot be read (gone, or no longer the service's to read):
    the pages list every other object of the version and name that run, once, and the
    version's count is unknown."""
    with api.client() as client:
        create_key(client)
        assert encrypt(client, b"plain", destination={"key": "docs/a"}).status_code == 201
        stream_in(client, MEMBERS)
        run = RunMarker(
            tenant=TENANT,
            kid=KID,
            key_version=1,
            bucket="a-bucket-gone",
            storage_prefix=f"{STORAGE_PREFIX}elsewhere/",
            job_id="a-job",
            created_at=datetime.now(UTC),
        )
        api.records.put(RUN_MARKER_KIND, run.name, run)
        expected = sorted(["docs/a", "out/manifest.json", *(f"out/{m}" for m in MEMBERS)])
        gone = {"bucket": "a-bucket-gone", "prefix": "elsewhere/", "error": "bucket-not-found"}
        for limit in (100, 3, 1):
            keys, unreadable = listed_and_unreadable(client, 1, limit)
            assert sorted(keys) == expected
            assert unreadable == [gone]
        assert object_counts(client) == {1: None}  # unknown, not an error
