"""Resumable encrypt-to-storage: one message sealed into storage over many requests, from
any API process in turn (the tus protocol's uploads, `api.routes.uploads`), with no
plaintext at rest and no nonce used twice.

An upload is created with its plaintext's length: its message's header is made then (the
data key exists only wrapped in it), its part upload started, and its state sealed
(`storage.integrity`) under

    sealstream/uploads/<id>.json      the state: part upload, header, offset, parts, ...
    sealstream/uploads/<id>.<g>.staged  ciphertext of the current part so far (header
                                      first), written by the request that held
                                      generation g of the state (none while it is
                                      the header alone, which the state holds)

The message is laid out from the length: frame i (from 1) is regular but for the last,
number length // frame length + 1, which holds the rest (perhaps nothing); a part holds a
whole number of frames (the first, the header too), at least S3's 5 MiB, and at most
10,000 parts make the message. Whatever request seals frame i, it seals the same frame.

A PATCH takes plaintext from the acknowledged offset on, always a frame boundary. Whole
frames are sealed a batch at a time (up to the end of the current part), in four steps,
each batch a step behind the one before it (three part buffers in turn):

1. each frame's plaintext is hashed (SHA-256) as it arrives, and the frames are sealed
   (by `envelope.message.resume_message`'s sealer, under the frame's number as IV) into
   memory only;
2. each frame's HMAC, under a key derived for this alone and bound to the upload and the
   frame's number, is taken over its digest; a frame whose HMAC is in the state already
   must have had the very same plaintext, or the request is refused (409) and its
   ciphertext dropped unstored;
3. their HMACs go into the state, written before any of their ciphertext is stored,
   while the batch before is stored;
4. they are stored, a part once full, else the staging object; the parts are synced
   every `SYNC_FRAMES` frames and at the PATCH's end (a local directory syncs its one
   part file then, not each part as it is put), and the next write of the state (3, or
   the PATCH's last) acknowledges what was synced before it began.

A frame stored twice is thus sealed from the same bytes into the same bytes: no two
plaintexts sealed under one (key, IV) are ever stored, even when a crash came between
step 4 and its acknowledgement and the client sends other bytes. A partial frame's plaintext is only
ever in memory, and is sent again.

Every write of the state is conditional on the state read (its etag): a PATCH holds the
upload's lock (`locked_until`), and one that finds it held is refused (423). The chain
value of the plaintext's digest (`services.frame_chain`) is kept masked under a key of
its own, so the state confirms no guess of the plaintext to whoever reads the bucket.
"""

import base64
import hashlib
import hmac
import logging
import secrets
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import Field

from envelope import DataKeyUnavailable, parse_header
from envelope.frames import FINAL_OVERHEAD, REGULAR_OVERHEAD, FrameSealer
from envelope.message import resume_message
from keystore import KeyStore, KeystoreError
from services.frame_chain import CHAIN_START, chain_step
from services.inventory import Inventory, Marker, record_at
from services.keys import start_sealing
from services.objects import header_digest, object_metadata
from services.open_stored import holds_recorded_message
from services.placement import BucketNotAllowed, Placement, Spaces
from services.replicas import NotReplicated
from services.seal_to_storage import HASHING
from services.upload_anchor import GONE, MARGIN, Anchored, AnchorNotDurable, UploadAnchor
from storage import (
    MAX_PARTS,
    MIN_PART_SIZE,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    Part,
    PartUpload,
    PreconditionFailed,
    StorageError,
)
from storage.documents import FrozenCamelModel
from storage.integrity import Records, RecordTampered, canonical_json, note_refusal
from storage.pools import ForkSafePool
from storage.records import (
    ObjectRecord,
    drop_intent,
    load_intent,
    load_record,
    next_generation,
    save_intent,
    save_record,
)

logger = logging.getLogger(__name__)

UPLOADS_PREFIX = "sealstream/uploads/"
STATE_KIND = "upload"
COMPLETED_KIND = "upload-completed"
MAC_PURPOSE = "resumable-frame-mac"
MASK_PURPOSE = "resumable-chain-mask"
_FRAME_MAC = struct.Struct(">QB")  # sequence number, final
# A PATCH holds up to a part of plaintext and two of ciphertext (one being sealed, one
# being stored) in memory; parts grow past the 5 MiB floor once 10,000 would not hold
# the upload: at 1 TiB, to ~105 MiB.
MAX_LENGTH = 1 << 40
# Each part stored costs a write of the state and durable writes of the part (a few
# fsyncs on a local directory), so parts are larger than S3's floor: fewer of them.
PART_TARGET = max(MIN_PART_SIZE, 16 << 20)
# Frames a PATCH stores, at most, before it syncs them (one fsync of a local directory's
# part file, every so many whole parts, at least one) and its next write of the state
# acknowledges them; the rest at its end. Until then their HMACs stay in the state, which
# each write rewrites: 8 parts of 1 MiB frames, or each part where frames are so small
# that a part holds more.
SYNC_FRAMES = 128
# Plaintext hashed in one go: frames of 1 MiB (the default) each on their own.
HASH_GROUP = 1 << 20
# Where each PATCH's parts are stored, one at a time, and its state written, while the
# PATCH seals the next part.
STORING = ForkSafePool("sealstream-upload-store")


class UploadRefused(Exception):
    """A request on an upload that cannot be served as sent; `code` names why."""

    code = "upload-refused"


class UploadNotFound(UploadRefused):
    code = "upload-not-found"


class UploadBusy(UploadRefused):
    """Another request holds the upload, or changed it meanwhile."""

    code = "upload-locked"


class OffsetMismatch(UploadRefused):
    code = "upload-offset-mismatch"


class ResentBytesDiffer(UploadRefused):
    """Bytes sent again for frames already recorded are not the bytes recorded."""

    code = "resent-bytes-differ"


class PatchTooShort(UploadRefused):
    """A PATCH that could not move the offset: less than one frame, and not the end."""

    code = "patch-too-short"


class UploadTooLong(UploadRefused):
    code = "upload-length-exceeded"


class UploadUnsupported(UploadRefused):
    """An upload this service cannot resume: one whose message must be signed."""

    code = "resumable-upload-unsupported"


class UploadTampered(UploadRefused):
    """The staged ciphertext is not what the state recorded: changed in the bucket."""

    code = "upload-tampered"


class TooManyUploads(UploadRefused):
    """The tenant has as many unfinished uploads as it may."""

    code = "too-many-open-uploads"


class UploadsNeedRedis(UploadRefused):
    """Resumable uploads on a bucket with no Redis to anchor their states' generations."""

    code = "resumable-uploads-need-redis"


class UploadsNeedDurableRedis(UploadRefused):
    """Resumable uploads anchored in a Redis that may lose the writes it answered last."""

    code = "resumable-uploads-need-durable-redis"


class StoredPart(FrozenCamelModel):
    number: int
    offset: int
    size: int
    etag: str
    checksum: str = ""

    def part(self) -> Part:
        return Part(self.number, self.offset, self.size, self.etag, self.checksum)


class UploadState(FrozenCamelModel):
    """What any process needs to go on with an upload; sealed, never trusted unsealed."""

    id: str
    tenant: str
    bucket: str
    key: str  # as the client named it
    storage_key: str
    overwrite: bool
    kid: str
    key_version: int
    alg: str
    length: int  # of the plaintext
    frame_length: int
    frames_per_part: int
    header: str  # base64 of the message's header: its data key wrapped only
    upload_id: str
    storage_metadata: dict[str, str]
    offset: int = 0  # acknowledged: sealed and stored
    frames: int = (
        0  # acknowledged (the empty final frame ends at the same offset as the one before)
    )
    parts: tuple[StoredPart, ...] = ()
    staging: int = 0  # the staging object's name: the generation its writer held
    staged: int = 0  # bytes of the staging object that belong to the current part
    staged_sha256: str = ""
    chain: str  # the frame chain up to `offset`, masked (hex)
    # HMACs of frames recorded past `offset`, by sequence number: sealed perhaps, not yet
    # acknowledged. Frames before `offset` are never sealed again (a PATCH starts there).
    macs: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    expires_at: datetime
    locked_until: datetime | None = None
    lock: str = ""
    # Writes of this state so far; Redis holds the count (`services.upload_anchor`).
    generation: int = 0

    @property
    def name(self) -> str:
        return state_name(self.id)

    @property
    def held(self) -> bool:
        """Whether a request holds the upload's lock now."""
        return self.locked_until is not None and self.locked_until > datetime.now(UTC)

    @property
    def header_bytes(self) -> bytes:
        return base64.b64decode(self.header)

    @property
    def total_frames(self) -> int:
        return self.length // self.frame_length + 1

    @property
    def next_frame(self) -> int:
        return self.frames + 1

    @property
    def finished(self) -> bool:
        return self.frames == self.total_frames

    @property
    def last_full(self) -> int:
        """The last frame that holds bytes (1 for an empty plaintext): an empty final
        frame rides in its part, so that the offset reaches the length only once every
        frame is stored."""
        if self.length % self.frame_length:
            return self.total_frames
        return max(1, self.total_frames - 1)

    def part_of(self, frame: int) -> int:
        return (min(frame, self.last_full) - 1) // self.frames_per_part + 1

    def last_of_part(self, frame: int) -> int:
        """The last frame of the part `frame` is in."""
        last = self.part_of(frame) * self.frames_per_part
        return self.total_frames if last >= self.last_full else last

    def part_offset(self, part: int) -> int:
        if part == 1:
            return 0
        regular = REGULAR_OVERHEAD + self.frame_length
        return len(self.header_bytes) + (part - 1) * self.frames_per_part * regular

    def ends_part(self, frame: int) -> bool:
        return frame == self.last_of_part(frame)

    def end_of(self, frame: int) -> int:
        """The plaintext offset where `frame` ends."""
        return min(self.length, frame * self.frame_length)

    @property
    def part_size(self) -> int:
        """Bytes of ciphertext in a whole part, the first's header aside."""
        return self.frames_per_part * (REGULAR_OVERHEAD + self.frame_length)

    def part_upload(self) -> PartUpload:
        return PartUpload(self.storage_key, self.upload_id, self.storage_metadata)

    def ciphertext_size(self) -> int:
        regular = REGULAR_OVERHEAD + self.frame_length
        final = FINAL_OVERHEAD + self.length % self.frame_length
        return len(self.header_bytes) + (self.total_frames - 1) * regular + final


def state_digest(state: UploadState) -> str:
    """What Redis anchors a state by: the SHA-256 of the record its seal authenticates."""
    return hashlib.sha256(canonical_json(state.model_dump(mode="json"))).hexdigest()


def state_name(upload: str) -> str:
    return f"{UPLOADS_PREFIX}{upload}.json"


def completion_name(upload: str) -> str:
    return f"{UPLOADS_PREFIX}{upload}.completed"


def staging_name(upload: str, generation: int) -> str:
    """The staging object written by the request that wrote the state's `generation`."""
    if not generation:  # one an older version wrote, under the upload's one name
        return f"{UPLOADS_PREFIX}{upload}.staged"
    return f"{UPLOADS_PREFIX}{upload}.{generation}.staged"


def frames_per_part(length: int, frame_length: int) -> int:
    """Whole frames per part: about `PART_TARGET` a part (never under S3's 5 MiB), at
    most 10,000 parts."""
    frames = length // frame_length + 1
    regular = REGULAR_OVERHEAD + frame_length
    return max(-(-PART_TARGET // regular), -(-frames // MAX_PARTS))


@dataclass(frozen=True)
class NewUpload:
    """What a client asks for when it creates an upload."""

    kid: str
    length: int
    frame_length: int
    context: dict[str, str]
    overwrite: bool


@dataclass(frozen=True)
class CompletedUpload:
    """An upload completed already: its object made and recorded, its state erased."""

    length: int


class CompletionNote(FrozenCamelModel):
    """Redis's tombstone of a completed upload, where uploads are not anchored: sealed
    beside the states (`completion_name`), kept until a day past the upload's expiry."""

    id: str
    tenant: str
    length: int
    expires_at: datetime

    @property
    def kept_until(self) -> datetime:
        return self.expires_at + MARGIN


@dataclass
class Swept:
    """What a sweep of the uploads past their expiry did: the uploads it aborted, and
    those it completed (or recorded, made by a completion cut off)."""

    expired: list[UploadState] = field(default_factory=list)
    completed: list[UploadState] = field(default_factory=list)


class Uploads:
    """The resumable uploads of every tenant, kept in the service's store."""

    def __init__(
        self,
        records: Records,
        keys: KeyStore,
        spaces: Spaces,
        *,
        expiry: timedelta,
        lock_for: timedelta,
        anchor: UploadAnchor | None,
        need_anchor: bool,
        max_open: int,
    ) -> None:
        self.records = records
        self.max_open = max_open
        self.anchor = anchor
        self.need_anchor = need_anchor
        self.keys = keys
        self.spaces = spaces
        self.expiry = expiry
        self.lock_for = lock_for

    def create(self, tenant: str, placement: Placement, new: NewUpload) -> UploadState:
        """Start the message (its key's use counted now) and its part upload, and save
        its state; nothing is sealed yet. An object already at the destination is
        refused now (`ObjectExists`) unless it is to be replaced; one stored meanwhile
        is refused at completion."""
        self._refuse_unanchored()
        if not new.overwrite and _exists(placement.store, placement.storage_key):
            raise ObjectExists("the object already exists", placement.storage_key)
        record, _ = self.keys.encryption_keyring(tenant, new.kid)
        if record.may_be_known_outside:
            # Such a key's messages are signed (`services.keys.start_sealing`), and a
            # signature's hash over the whole message cannot be carried between requests.
            raise UploadUnsupported(
                f"key {new.kid!r} is imported or was exportable: its messages are signed, "
                "which a resumable upload cannot write; use the streaming route"
            )
        upload_id, now = secrets.token_hex(16), datetime.now(UTC)
        self._admit(tenant, upload_id, now + self.expiry)
        try:
            state, etag = self._start(tenant, placement, new, upload_id, now)
        except BaseException:
            if self.anchor is not None:
                self.anchor.free(tenant, upload_id)
            raise
        if state.length == 0:  # a tus client sends no PATCH for it: complete it now
            return self._take(state, etag).end()
        return state

    def _start(
        self, tenant: str, placement: Placement, new: NewUpload, upload_id: str, now: datetime
    ) -> tuple[UploadState, str]:
        """Start the message and its part upload, and save the state of upload
        `upload_id`, created `now`; the state and its etag."""
        sealing = start_sealing(
            self.keys,
            tenant,
            new.kid,
            new.context,
            new.frame_length,
            object_key=placement.storage_key,
        )
        header = sealing.encryptor.header.to_bytes()
        store = placement.store
        upload = store.start_parts(placement.storage_key, metadata=object_metadata(sealing))
        state = UploadState(
            id=upload_id,
            tenant=tenant,
            bucket=placement.bucket,
            key=placement.key,
            storage_key=placement.storage_key,
            overwrite=new.overwrite,
            kid=sealing.key.kid,
            key_version=sealing.key.primary_version,
            alg=sealing.key.alg,
            length=new.length,
            frame_length=new.frame_length,
            frames_per_part=frames_per_part(new.length, new.frame_length),
            header=base64.b64encode(header).decode("ascii"),
            upload_id=upload.upload_id,
            storage_metadata=upload.metadata,
            staging=1,
            staged=len(header),
            staged_sha256=hashlib.sha256(header).hexdigest(),
            chain="",
            created_at=now,
            expires_at=now + self.expiry,
            generation=1,
        )
        state = state.model_copy(update={"chain": self._masked(state, CHAIN_START, 0)})
        try:
            if self.anchor is not None and not self.anchor.start(
                state.id, state.generation, state_digest(state), state.expires_at
            ):
                raise UploadBusy("an upload of this id exists already")
            etag = self.records.put(STATE_KIND, state.name, state, if_absent=True).etag
        except BaseException:
            with suppress(StorageError):
                store.abort_parts(upload)
            raise
        return state, etag

    def _admit(self, tenant: str, upload: str, expires_at: datetime) -> None:
        """Count a new upload among the tenant's open ones, or refuse it past the cap:
        in Redis where uploads are anchored (one count for every API process; an upload
        leaves it when it ends, or at its expiry should its end be lost with a crash),
        else by the states in the store, read at each creation (unanchored uploads are
        served on the embedded default alone: one directory; creations at one moment may
        pass the cap by a few)."""
        if self.anchor is not None:
            admitted = self.anchor.admit(tenant, upload, expires_at, self.max_open)
        else:
            now = datetime.now(UTC)
            states = self.records.all(STATE_KIND, UPLOADS_PREFIX, UploadState, ".json")
            live = [state for _, state in states if state.expires_at > now]
            admitted = sum(state.tenant == tenant for state in live) < self.max_open
        if not admitted:
            raise TooManyUploads(
                f"this tenant has {self.max_open} unfinished uploads, as many as it may: "
                "finish or terminate one, or wait for one to expire"
            )

    def get(
        self, tenant: str, upload: str
    ) -> "tuple[UploadState, ObjectRecord | None] | CompletedUpload":
        """The tenant's upload `upload`: `UploadNotFound` if there is none (or another
        tenant's: one is never told from the other). One whose every frame is stored but
        whose completion failed is completed first, its record returned with it: a tus
        client takes the full offset for an object made, and sends nothing more. One a
        request is completing meanwhile is answered as it stands, never waited for: its
        offset, the length, is acknowledged (every frame stored). One completed already
        is `CompletedUpload` while its tombstone says so (where Redis anchors uploads)."""
        try:
            state, etag = self._read(tenant, upload)
        except UploadNotFound:
            completed = self._completed(tenant, upload)
            if completed is None:
                raise
            return completed
        if not state.finished or state.held:
            return state, None
        try:
            appending = self._take(state, etag)
        except UploadBusy:  # another request took it meanwhile, to complete it
            return state, None
        return appending.end(), appending.record

    def _completed(self, tenant: str, upload: str) -> CompletedUpload | None:
        """The tenant's upload `upload` if it was completed, as its tombstone (Redis's,
        or unanchored the sealed note beside the states) says, while that lives."""
        if not _is_upload_id(upload):
            return None
        if self.anchor is not None:
            length = self.anchor.completed(upload, tenant)
            return None if length is None else CompletedUpload(length)
        try:
            note = self.records.get(COMPLETED_KIND, completion_name(upload), CompletionNote)
        except ObjectNotFound:
            return None
        if (note.id, note.tenant) != (upload, tenant) or note.kept_until <= datetime.now(UTC):
            return None
        return CompletedUpload(note.length)

    def begin(
        self,
        tenant: str,
        upload: str,
        offset: int,
        sent: int | None,
        admit: Callable[[UploadState], None],
    ) -> "Appending":
        """Take the upload's lock for a PATCH of `sent` bytes (None: unknown) from
        `offset`, refusing one that could never move the offset; `admit(state)`, called
        once the upload is read and before its lock is taken, may refuse it too (the
        server's cap on what requests hold)."""
        state, etag = self._read(tenant, upload)
        if offset != state.offset:
            raise OffsetMismatch(f"the upload is at offset {state.offset}, not {offset}")
        left = state.length - state.offset
        if sent is not None and sent > left:
            raise UploadTooLong(f"{sent} bytes sent where {left} are left of the upload")
        if sent is not None and sent < min(left, state.frame_length):
            raise PatchTooShort(
                f"a PATCH carries at least one frame ({state.frame_length} bytes) or the "
                "rest of the upload: less cannot move the offset"
            )
        admit(state)
        return self._take(state, etag)

    def _take(self, state: UploadState, etag: str) -> "Appending":
        """Take the upload's lock (`UploadBusy` if a request holds it)."""
        if state.held:
            raise UploadBusy("another request is writing this upload")
        now = datetime.now(UTC)
        locked = state.model_copy(
            update={"lock": secrets.token_hex(16), "locked_until": now + self.lock_for}
        )
        locked, etag = self._save(locked, etag, state)
        try:
            return Appending(self, locked, etag)
        except BaseException:
            self._release(locked, etag)
            raise

    def terminate(self, tenant: str, upload: str) -> None:
        """Abort the upload and erase its state (unless a PATCH holds it: `UploadBusy`)."""
        state, _ = self._read(tenant, upload)
        if state.held:
            raise UploadBusy("a request is writing this upload")
        self._erase(state, abort=True)

    def expire(self, now: datetime | None = None) -> "Swept":
        """Abort every upload past its expiry and erase its state (the lifecycle sweep);
        one whose every frame is stored is completed instead (or, made by a completion
        cut off, recorded), and one a PATCH holds is left to a later sweep. One that
        cannot be expired yet is logged and left: the others go on. The uploads aborted,
        and those completed, whose objects their sweep is to have verified as a request
        completing them would."""
        moment = now or datetime.now(UTC)
        swept = Swept()
        notes = self.records.all(COMPLETED_KIND, UPLOADS_PREFIX, CompletionNote, ".completed")
        for name, note in notes:
            if name != completion_name(note.id) or note.kept_until <= moment:
                self.records.store.delete(name)
        # Only the states: a staging object read as a record would be counted as tampered.
        for name, state in self.records.all(STATE_KIND, UPLOADS_PREFIX, UploadState, ".json"):
            if name != state.name or state.expires_at > moment:
                continue
            try:
                self._expire(state, swept)
            except (StorageError, UploadRefused, KeystoreError, DataKeyUnavailable) as error:
                # A key that cannot read its object back now tells nothing either way.
                logger.warning("cannot expire upload %s yet: %s", state.id, error)
        return swept

    def _expire(self, state: UploadState, swept: "Swept") -> None:
        """Complete an expired upload whose every frame is stored, else abort it and
        erase its state, noting which in `swept`. One a PATCH holds is left until its
        lock lapses: erased under it, the PATCH would write its staging object back."""
        if state.held:
            return
        if state.finished:  # whole, its completion failed: made, not thrown away
            try:
                self._check_generation(state)
                self._take(state, self.records.store.head(state.name).etag).end()
            except (BucketNotAllowed, UploadNotFound, UploadTampered) as refused:
                # It can never complete (the tenant lost the bucket; Redis refuses its
                # state; a part or the staging object was changed): aborted as an
                # unfinished one is.
                logger.warning("aborting expired upload %s: %s", state.id, refused)
            else:
                swept.completed.append(state)
                return
        self._erase(state, abort=True)
        swept.expired.append(state)

    def erased(self, upload: str) -> bool:
        """Whether the upload was erased (finished, terminated or expired): its tombstone
        is in Redis or, unanchored, its state is gone."""
        if self.anchor is not None:
            return self.anchor.current(upload) == GONE
        return not _exists(self.records.store, state_name(upload))

    def finish(self, state: UploadState, etag: str) -> ObjectRecord:
        """Make the object of an upload whose every frame is stored visible, record it,
        and erase the upload's state. One made already, by a completion whose end was
        cut off (a crash, or the store's answer lost), is recorded as it would have been."""
        store = self.spaces.store(state.tenant, state.bucket)
        intent = self._intent(store, state)
        try:
            record = self._complete(store, state, intent)
        except ObjectNotFound:
            # The part upload is gone: the object at the key is this upload's only if
            # its parts made it (a completion cut off after it), never merely because it
            # looks so (its header and size are no secret).
            made = self._made(store, state, intent)
            if made is None:
                raise _parts_gone(state) from None
            record = self._record_made(state, intent, made)
        try:
            self._erase(state, abort=False, completed=True)
        except NotReplicated as unconfirmed:
            # The object is made and recorded, and the tombstone is on Redis's master:
            # the upload is over. A failover that lost the tombstone would let a copy of
            # this state back in, which would find its object made and record it again.
            logger.warning("upload %s completed, its end unconfirmed: %s", state.id, unconfirmed)
            self._forget(state, abort=False)
        return record

    def _made(
        self, store: ObjectStore, state: UploadState, intent: ObjectRecord
    ) -> ObjectInfo | None:
        """The object at the upload's key if the upload's completion made it, its end cut
        off (a crash, or the store's answer lost). Where part etags are MD5s, its etag
        proves it (a cheap HEAD). Where that does not prove it, it is read back whole and
        must be the message `intent` names, frame by frame (`holds_recorded_message`): a
        local directory's etags are version tokens a writer of the directory may set, and
        S3's under SSE-KMS look like MD5s but are none, so a genuine object's etag is
        not the MD5 of its parts'. Its header and size alone prove nothing: they are no
        secret."""
        expected = _completed_etag(state.parts)
        if expected is not None and store.derives_etags:
            made = _made_from_parts(store, state, expected)
            if made is not None:
                return made
        return holds_recorded_message(self.keys, store, intent)

    def recorded_as_made(self, state: UploadState) -> bool:
        """Whether the record at the upload's key is of the upload's message (its
        completion recorded it): records are the service's own, sealed."""
        with suppress(ObjectNotFound, RecordTampered):
            recorded = load_record(self.records, state.bucket, state.storage_key)
            return recorded.header_sha256 == header_digest(parse_header(state.header_bytes))
        return False

    def _intent(self, store: ObjectStore, state: UploadState) -> ObjectRecord:
        """The record the upload's object will have once it is visible, but for what
        only its completion tells (size, etag, time)."""
        replaced = record_at(self.records, store, state.storage_key) if state.overwrite else None
        return ObjectRecord(
            bucket=state.bucket,
            key=state.storage_key,
            tenant=state.tenant,
            kid=state.kid,
            key_version=state.key_version,
            alg=state.alg,
            frame_length=state.frame_length,
            plaintext_size=state.length,
            plaintext_frame_chain=self._unmasked(state).hex(),
            ciphertext_size=state.ciphertext_size(),
            etag="",
            created_at=datetime.now(UTC),
            header_sha256=header_digest(parse_header(state.header_bytes)),
            generation=next_generation(replaced),
        )

    def _complete(
        self, store: ObjectStore, state: UploadState, intent: ObjectRecord
    ) -> ObjectRecord:
        """Complete the part upload, its intent noted first, and record the object;
        `ObjectNotFound` if the part upload is gone."""
        self._check_parts(store, state)
        marker = Marker.new(
            state.tenant, state.kid, state.key_version, state.bucket, state.storage_key
        )
        inventory = Inventory(self.records)
        ours = inventory.add(marker)
        parts = [part.part() for part in state.parts]
        try:
            save_intent(self.records, intent)
            info = store.complete_parts(state.part_upload(), parts, if_absent=not state.overwrite)
        except BaseException:
            if ours:  # the intent stays: the sweep records an object made visible after all
                with suppress(StorageError):
                    inventory.remove(marker)
            raise
        return self._recorded(intent, info)

    def _record_made(
        self, state: UploadState, intent: ObjectRecord, made: ObjectInfo
    ) -> ObjectRecord:
        """The record of the upload's object, made by a completion cut off after it: the
        one saved then if it was, else the intent that completion noted (its generation),
        else `intent`."""
        with suppress(ObjectNotFound, RecordTampered):
            recorded = load_record(self.records, state.bucket, state.storage_key)
            if recorded.header_sha256 == intent.header_sha256:
                return recorded
        with suppress(ObjectNotFound, RecordTampered):
            intent = load_intent(
                self.records, state.bucket, state.storage_key, intent.header_sha256
            )
        Inventory(self.records).add(
            Marker.new(state.tenant, state.kid, state.key_version, state.bucket, state.storage_key)
        )
        return self._recorded(intent, made)

    def _recorded(self, intent: ObjectRecord, info: ObjectInfo) -> ObjectRecord:
        """Save the record of the object `info` describes, whose intent was `intent`."""
        record = intent.model_copy(
            update={
                "ciphertext_size": info.size,
                "etag": info.etag,
                "created_at": info.last_modified,
            }
        )
        save_record(self.records, record)
        with suppress(StorageError):  # one left over is dropped by the sweep
            drop_intent(self.records, intent)
        return record

    def _check_parts(self, store: ObjectStore, state: UploadState) -> None:
        """Refuse to complete an upload whose parts in the store are not those its state
        recorded (numbers, sizes, etags, checksums where listed): a part added, replaced
        or taken away by whoever can write the bucket. A local directory lists none: its
        parts are one file, whose frames the object's verify job checks."""
        listed = store.listed_parts(state.part_upload())  # ObjectNotFound: the upload is gone
        if listed is None:
            return
        recorded = [part.part() for part in state.parts]
        if len(listed) == len(recorded) and all(map(_same_part, recorded, listed)):
            return
        refusal = RecordTampered(
            f"the store lists parts {[part.number for part in listed]} of sizes "
            f"{[part.size for part in listed]} where {len(recorded)} were stored, or other "
            "etags or checksums",
            state.name,
        )
        note_refusal(STATE_KIND, refusal)
        raise UploadTampered("the upload's parts in the bucket are not those it stored")

    def frame_mac(self, state: UploadState, frame: int, digest: bytes) -> str:
        """The HMAC recorded for a frame's plaintext, taken over its SHA-256 `digest` (the
        one its link of the frame chain takes, so the plaintext is hashed once): bound to
        the upload and the frame, under a key for this alone, so that it confirms no
        guess to a reader of the state (a bare hash of a guessed frame would)."""
        return self.frame_macs(state, frame, [digest])[0]

    def frame_macs(self, state: UploadState, first: int, digests: list[bytes]) -> list[str]:
        """`frame_mac` of frames `first`, `first` + 1, ... whose SHA-256s are `digests`,
        under one derivation of the key (a PATCH takes a part's worth at a time)."""
        key, upload = self.records.key.derive(MAC_PURPOSE), state.id.encode("ascii")
        return [
            hmac.digest(
                key, upload + _FRAME_MAC.pack(frame, frame == state.total_frames) + digest, "sha256"
            ).hex()
            for frame, digest in enumerate(digests, start=first)
        ]

    def _masked(self, state: UploadState, chain: bytes, offset: int) -> str:
        return bytes(a ^ b for a, b in zip(chain, self._mask(state, offset), strict=True)).hex()

    def _unmasked(self, state: UploadState) -> bytes:
        masked = bytes.fromhex(state.chain)
        return bytes(a ^ b for a, b in zip(masked, self._mask(state, state.offset), strict=True))

    def _mask(self, state: UploadState, offset: int) -> bytes:
        """A pad for the chain value at `offset`: the chain there is one value (the
        frames before it are fixed once sealed), so a pad per offset is used for one."""
        message = state.id.encode("ascii") + offset.to_bytes(8, "big")
        return hmac.digest(self.records.key.derive(MASK_PURPOSE), message, "sha256")

    def _read(self, tenant: str, upload: str) -> tuple[UploadState, str]:
        """The state and its etag (taken first: a state changed in between then fails
        the conditional write that follows)."""
        self._refuse_unanchored()
        if not _is_upload_id(upload):
            raise UploadNotFound("no such upload")
        name = state_name(upload)
        try:
            etag = self.records.store.head(name).etag
            state = self.records.get(STATE_KIND, name, UploadState)
        except ObjectNotFound:
            raise UploadNotFound("no such upload") from None
        if state.id != upload:
            raise RecordTampered("it describes another upload", name)
        if state.tenant != tenant:
            raise UploadNotFound("no such upload")
        if state.expires_at <= datetime.now(UTC):
            raise UploadNotFound("no such upload")  # the sweep erases it
        self._check_generation(state)
        return state, etag

    def _refuse_unanchored(self) -> None:
        if not self.need_anchor:
            return
        if self.anchor is None:
            raise UploadsNeedRedis(
                "resumable uploads need SEALSTREAM_REDIS_URL where the store does not hold "
                "the KEK itself: use the streaming route"
            )
        try:
            self.anchor.durability()
        except AnchorNotDurable as refused:
            raise UploadsNeedDurableRedis(str(refused)) from None

    def _check_generation(self, state: UploadState) -> None:
        """Refuse a state that is not the upload's: put back from an older copy, or
        brought back after the upload ended. The one a write in flight replaces is still
        the upload's (`services.upload_anchor`): its offset covers only frames sealed and
        stored, its HMACs every frame whose ciphertext may be stored."""
        if self.anchor is None:
            return
        anchored = self.anchor.current(state.id)
        if anchored == GONE:
            raise UploadNotFound("no such upload")
        if isinstance(anchored, Anchored) and anchored.accepts(
            state.generation, state_digest(state)
        ):
            return
        refusal = RecordTampered(
            f"generation {state.generation} is not the one Redis anchors ({anchored})",
            state.name,
        )
        note_refusal(STATE_KIND, refusal)
        raise UploadTampered("the upload's state is not the last one written")

    def _save(self, state: UploadState, etag: str, last: UploadState) -> tuple[UploadState, str]:
        """Write `state` as the next generation after `last` (the state as read or
        written, at `etag`), conditional on `etag`. Redis anchors it in flight first, and
        marks it written once it is; its caller stores the frames it records only after
        that. So while it is in flight, `last` may still be taken up once the step's hold
        is over (its writer died or stalled before the bucket write; before then, another
        request that read `last` is refused): `last` holds the HMAC of every frame whose ciphertext
        may be stored (those it or an earlier state recorded and did not acknowledge,
        including the ones this write acknowledges), and the frames only this state
        records were stored nowhere, so whatever seals them later seals them once."""
        written = state.model_copy(update={"generation": last.generation + 1})
        read = (last.generation, state_digest(last))
        moved = (written.generation, state_digest(written))
        anchor, step = self.anchor, None
        if anchor is not None:
            step = anchor.advance(state.id, read, moved, _hold(written, last))
            if step is None:
                raise UploadBusy("the upload was changed by another request meanwhile")
        try:
            etag = self.records.put(STATE_KIND, state.name, written, if_match=etag).etag
        except (PreconditionFailed, ObjectNotFound):
            # Another state than `read` is in the bucket: this very one, if the write
            # landed and its answer was lost (a retry then finds the etag moved on), else
            # one written by a request that stalled past its hold, which Redis then
            # refuses once the anchor is put back as it was.
            landed = self._landed(written)
            if landed is None:
                if anchor is not None and step is not None:
                    anchor.undo(state.id, step)
                raise UploadBusy("the upload was changed by another request meanwhile") from None
            etag = landed
        if anchor is not None and step is not None and not anchor.commit(state.id, step):
            raise UploadBusy("the upload was taken over by another request meanwhile")
        return written, etag

    def _landed(self, written: UploadState) -> str | None:
        """The etag of the state in the bucket if it is `written` itself, else None."""
        try:
            etag = self.records.store.head(written.name).etag
            held = self.records.get(STATE_KIND, written.name, UploadState)
        except (ObjectNotFound, RecordTampered):
            return None
        return etag if state_digest(held) == state_digest(written) else None

    def _release(self, state: UploadState, etag: str) -> None:
        with suppress(UploadBusy, StorageError):
            self._save(state.model_copy(update={"lock": "", "locked_until": None}), etag, state)

    def _erase(self, state: UploadState, *, abort: bool, completed: bool = False) -> None:
        if self.anchor is not None:
            length = state.length if completed else None
            self.anchor.end(state.id, state.tenant, state.expires_at, completed=length)
        elif completed:  # Redis's tombstone, where there is none
            note = CompletionNote(
                id=state.id, tenant=state.tenant, length=state.length, expires_at=state.expires_at
            )
            self.records.put(COMPLETED_KIND, completion_name(state.id), note)
        self._forget(state, abort=abort)

    def _forget(self, state: UploadState, *, abort: bool) -> None:
        """Erase what the store holds of the upload, its tombstone left already."""
        if abort:
            # The service's own cleanup: whether the tenant may still use the bucket or not.
            self.spaces.own_store(state.bucket).abort_parts(state.part_upload())
        self.drop_staging(state.id)
        self.records.store.delete(state.name)

    def drop_staging(self, upload: str) -> None:
        """Erase the upload's staging objects (whoever erases an upload, or finds it
        erased): every one, as one a request wrote after its lock had lapsed is named by
        none of the states."""
        for staged in self.records.store.list(f"{UPLOADS_PREFIX}{upload}."):
            if staged.key.endswith(".staged"):
                self.records.store.delete(staged.key)


def _hold(written: UploadState, last: UploadState) -> timedelta:
    """What is left of the lock the writer of `written` holds: the one it takes, or for a
    write that releases it, the one it held."""
    until = written.locked_until or last.locked_until
    return max(timedelta(0), until - datetime.now(UTC)) if until else timedelta(0)


def _chained(chain: bytes, digests: list[bytes]) -> bytes:
    for digest in digests:
        chain = chain_step(chain, digest)
    return chain


def _same_part(recorded: Part, listed: Part) -> bool:
    """Whether a part listed is the one recorded; a store that lists no checksum has its
    etag compared alone. Etags are compared unquoted: S3-compatible stores differ in
    whether a listing quotes them as the answer to the part's upload did."""
    same = (recorded.number, recorded.size) == (listed.number, listed.size)
    etags = recorded.etag.strip('"') == listed.etag.strip('"')
    return same and etags and listed.checksum in ("", recorded.checksum)


def _made_from_parts(store: ObjectStore, state: UploadState, expected: str) -> ObjectInfo | None:
    """The object at the upload's key if its size is the message's and its etag
    `expected`, the one S3 gives an object completed from the parts the state recorded
    (the MD5 of their MD5s, then their count), which no other bytes have."""
    try:
        info = store.head(state.storage_key)
    except ObjectNotFound:
        return None
    if info.size != state.ciphertext_size() or info.etag.strip('"') != expected:
        return None
    return info


def _completed_etag(parts: tuple[StoredPart, ...]) -> str | None:
    """The etag S3 gives an object completed from `parts`, if their etags are MD5s."""
    digests = [part.etag.strip('"') for part in parts]
    if not digests or not all(len(d) == 32 and _is_hex(d) for d in digests):
        return None
    joined = b"".join(bytes.fromhex(digest) for digest in digests)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(digests)}"


def _parts_gone(state: UploadState) -> UploadTampered:
    """The refusal of an upload whose part upload is gone from the bucket while the
    object at its key is not its own: completed and replaced, or aborted, by whoever
    can write the bucket."""
    note_refusal(STATE_KIND, RecordTampered("its part upload is gone from the store", state.name))
    return UploadTampered(
        "the upload's parts are gone from the bucket, and the object at its key is not "
        "this upload's: nothing was recorded, and the upload is aborted at its expiry "
        "(Upload-Expires); upload the file again"
    )


def _exists(store: ObjectStore, key: str) -> bool:
    try:
        store.head(key)
    except ObjectNotFound:
        return False
    return True


def _is_upload_id(text: str) -> bool:
    return len(text) == 32 and _is_hex(text)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class _Recording:
    """A batch whose HMACs are being recorded (`ciphertext`: the part so far, sealed),
    by a write that acknowledges the first `acknowledging` batches stored."""

    recorded: Future["_Batch"]
    ciphertext: bytearray
    acknowledging: int


@dataclass(frozen=True)
class _Batch:
    """Frames sealed up to `last`, from the one after the last sealed before, and the
    chain value after them (their ciphertext is not kept once stored)."""

    last: int
    chain: bytes
    generation: int  # of the state that recorded their HMACs


@dataclass(frozen=True)
class _Stored:
    """A batch stored, which the next write of the state acknowledges once it is durable
    (`synced`: its store synced the parts, it and every one before it); `staging` names
    the staging object it wrote (`staged` bytes), if it wrote one."""

    batch: _Batch
    part: StoredPart | None  # None: staged
    staging: int
    staged: int
    staged_sha256: str
    synced: bool = False


def _digests(frames: list[bytearray]) -> list[bytes]:
    return [hashlib.sha256(frame).digest() for frame in frames]


class Appending:
    """One PATCH: plaintext in (`write`), kept a frame at a time and hashed as it comes;
    whole frames sealed a part at a time, each part stored on a thread of its own while
    the next is sealed; `end` seals what whole frames are left, acknowledges them,
    releases the lock and, once every frame is stored, completes the object."""

    def __init__(self, uploads: Uploads, state: UploadState, etag: str) -> None:
        self._uploads = uploads
        # Held by each step (`write_chunks`, `end`, `abandon`, `gone`): a request cancelled
        # while one runs may start the next on another thread, which then waits.
        self._steps = threading.RLock()
        # As last written; the storing thread's while a batch is stored (`_settle` first).
        self.state = state
        self._etag = etag
        self._held = True
        self._layout = state  # the message's layout, which no write changes
        self._store = uploads.spaces.store(state.tenant, state.bucket)
        _, keyring = uploads.keys.resuming_keyring(state.tenant, state.kid, state.key_version)
        self._sealer: FrameSealer = resume_message(parse_header(state.header_bytes), [keyring])
        self._recorded = state.macs  # of frames perhaps sealed before: sent again, must match
        self._part = self._staged()  # ciphertext of the current part so far
        # Whole frames of plaintext not sealed yet, each with its SHA-256 to come (the
        # future of its write's frames, and its place among them); then the frame begun.
        self._frames: list[tuple[bytearray, Future[list[bytes]], int]] = []
        # The frame begun, as pieces of the chunks it came in (`_filled` bytes in all),
        # joined once whole: a frame is copied once, never zeroed, grown or cut.
        self._pieces: list[memoryview] = []
        self._filled = 0
        self._left = state.length - state.offset  # plaintext not received yet
        self._sealed = state.frames  # frames sealed, by this PATCH or acknowledged before
        # The chain value after the frames recorded (the recording thread's, as `state`).
        self._chain = uploads._unmasked(state)  # noqa: SLF001
        # A batch being recorded while the one before is stored, one of each at a time
        # (memory is bounded): its HMACs are recorded before it is handed on to be stored.
        self._recording: _Recording | None = None
        self._storing: Future[_Stored] | None = None
        self._in_store: bytearray | None = None  # the ciphertext being stored, if any
        self._spares: list[bytearray] = []  # buffers stored from, free to seal into
        self._stored: list[_Stored] = []  # durably stored, not acknowledged yet
        self._unsynced: list[_Stored] = []  # stored after the last sync of the parts
        # A sync failed: what was stored since the last one that did is never acknowledged.
        self._sync_failed = False
        self.record: ObjectRecord | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next plaintext; seal and store each part's worth once it is here."""
        self.write_chunks((data,))

    def write_chunks(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """Take the next plaintext, as the body's chunks came (never joined: each is
        copied once, into its frame); seal and store each part's worth once it is here."""
        with self._steps:
            self._queue(chunks)
            while self._batch_ready():
                self._seal_batch()

    def _queue(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """Cut `chunks` into frames, each a copy, queued to be sealed and hashed meanwhile
        on other threads; nothing of them is held here once queued."""
        views = [memoryview(chunk).cast("B") for chunk in chunks]
        size = sum(len(view) for view in views)
        if size > self._left:
            raise UploadTooLong("more bytes were sent than are left of the upload")
        self._left -= size
        whole = [frame for view in views for frame in self._whole_frames(view)]
        whole += self._final_frame(received=self._sealed + len(self._frames) + len(whole))
        if self._pieces:  # the caller may reuse its buffers once this returns
            self._pieces = [memoryview(bytearray().join(self._pieces))]
        # Hashed in groups of about HASH_GROUP bytes, on as many threads, while the
        # frames before them are sealed.
        group = -(-HASH_GROUP // self._layout.frame_length)
        for start in range(0, len(whole), group):
            frames = whole[start : start + group]
            digests = HASHING.executor.submit(_digests, frames)
            self._frames += [(frame, digests, place) for place, frame in enumerate(frames)]

    def end(self) -> UploadState:
        """Seal and store the whole frames received, acknowledge them, let go of the
        upload; complete it if it is whole. What is left of a frame is dropped."""
        with self._steps:
            return self._end()

    def _end(self) -> UploadState:
        try:
            self.write(b"")  # an empty plaintext's one frame is whole with no byte sent
            if self._frames_here():
                self._seal_batch()
            self._hand_on()
            self._settle()
            self._sync()
            if not self._acknowledging(self.state).finished:
                # Refused (423) if another request took the upload over meanwhile.
                self._acknowledge(hold=False)
                self._held = False
                return self.state
            if self._stored:  # still locked: it is completed next
                self._acknowledge(hold=True)
            self.record = self._finish()
        except BaseException:
            self.abandon()
            raise
        return self.state

    def _finish(self) -> ObjectRecord:
        try:
            return self._uploads.finish(self.state, self._etag)
        except ObjectExists:
            # An object stored at the key meanwhile, which this one may not replace: the
            # upload can never complete, and goes as a DELETE would take it, so that its
            # client is not told by HEAD that it is whole.
            self._uploads._erase(self.state, abort=True)  # noqa: SLF001
            raise

    def abandon(self) -> None:
        """Let go of the upload without sealing or storing more (the request failed),
        once the batch being recorded and the one being stored are: two threads never
        write one upload's state."""
        with self._steps:
            with suppress(Exception):
                self._take_recorded()  # its write may still be running
            with suppress(Exception):
                self._settle()
                self._sync()
            self._let_go()

    def _let_go(self) -> None:
        """Acknowledge what is stored, if anything, and release the lock: one write, if
        the upload is still this request's."""
        if self._held:
            with suppress(UploadBusy, StorageError):
                self._acknowledge(hold=False)
            self._held = False

    def gone(self) -> str | None:
        """Why the upload is gone from under this request, if it is (its lock lapsed,
        and another request completed it or terminated it, or the sweep took it); the
        staging object this request may have written since goes too."""
        with self._steps:
            if not self._uploads.erased(self.state.id):
                return None
            self._uploads.drop_staging(self.state.id)
            if self._uploads.recorded_as_made(self.state):
                return "another request completed the upload meanwhile: its object is stored"
            return "the upload was terminated, or expired and was erased, meanwhile"

    def _staged(self) -> bytearray:
        state = self.state
        if not state.staged:
            return bytearray()
        if state.staged == len(state.header_bytes) and not state.parts:
            staged = state.header_bytes  # no frame sealed yet: the part so far is the header
        else:
            try:
                staged = self._uploads.records.store.get(staging_name(state.id, state.staging))
            except ObjectNotFound:
                staged = b""
        staged = staged[: state.staged]
        if hashlib.sha256(staged).hexdigest() != state.staged_sha256:
            raise UploadTampered("the upload's staged ciphertext is not what was stored")
        return bytearray(staged)

    def _whole_frames(self, view: memoryview) -> list[bytearray]:
        """The frames `view` completes, each a buffer of its own."""
        length = self._layout.frame_length
        whole = []
        while view:
            taken = min(len(view), length - self._filled)
            self._pieces.append(view[:taken])
            self._filled += taken
            view = view[taken:]
            if self._filled == length:
                whole.append(self._joined())
        return whole

    def _final_frame(self, *, received: int) -> list[bytearray]:
        """The final frame, however short, once the last byte is here and `received`
        frames (whole ones) are not all of them."""
        if self._left or received >= self._layout.total_frames:
            return []
        return [self._joined()]

    def _joined(self) -> bytearray:
        """The frame begun, in one buffer of its own; the next begins."""
        frame = bytearray().join(self._pieces)
        self._pieces, self._filled = [], 0
        return frame

    def _frames_here(self) -> int:
        """Whole frames received, up to the end of the current part."""
        first = self._sealed + 1
        if first > self._layout.total_frames:
            return 0
        return min(len(self._frames), self._layout.last_of_part(first) - first + 1)

    def _batch_ready(self) -> bool:
        count = self._frames_here()
        return bool(count) and self._layout.ends_part(self._sealed + count)

    def _seal_batch(self) -> None:
        """Seal the whole frames received up to the end of the current part, into memory
        only, and have their HMACs checked and recorded (`_record`) while the batch
        before them is stored: none of their ciphertext leaves this process before."""
        layout, first, count = self._layout, self._sealed + 1, self._frames_here()
        taken, self._frames = self._frames[:count], self._frames[count:]
        # IV = the frame's number. Bytes sent again for a frame sealed before give the
        # ciphertext stored then, or differ and are refused before they are stored: a
        # ciphertext under a used IV that is never stored tells nobody anything.
        sealed = self._sealed_after(self._part, first, [plain for plain, _, _ in taken])
        digests = [(hashed, place) for _, hashed, place in taken]
        del taken  # the plaintext is not held while the batch before is stored
        last = first + count - 1
        self._part = bytearray() if layout.ends_part(last) else sealed
        self._hand_on()
        # One write both records these frames' HMACs (moved in Redis first, where
        # anchored) before any of their ciphertext can reach storage, and acknowledges
        # the batches stored and synced, not one still in flight or unsynced. So
        # whatever seals frame n later, from any process, seals the bytes recorded here
        # or nothing, and the offset moves only over frames sealed and durably stored.
        acknowledging = self._acknowledging(self.state)
        recorded = STORING.executor.submit(self._record, first, last, digests, acknowledging)
        self._recording = _Recording(recorded, sealed, len(self._stored))
        self._sealed = last

    def _hand_on(self) -> None:
        """Once the batch being recorded is, have it stored, once the one before it is."""
        recorded = self._take_recorded()
        if recorded is None:
            return
        batch, ciphertext = recorded
        self._settle()
        # The write that recorded it renewed the lock, but the wait for the part before
        # (a slow store) may have outlasted much of it. A request that took the upload
        # over would store this part itself (the same bytes), and a late second put
        # would change the part's etag under that request's record of it: the lock is
        # renewed first (UploadBusy if it was taken over), so the store starts with at
        # least half of it left.
        locked_until = self.state.locked_until or datetime.now(UTC)
        if locked_until - datetime.now(UTC) < self._uploads.lock_for / 2:
            self._write(self.state)
        if self._in_store is not None:
            self._spares.append(self._in_store)
        self._in_store = ciphertext
        self._storing = STORING.executor.submit(self._store_batch, batch, ciphertext)

    def _take_recorded(self) -> tuple[_Batch, bytearray] | None:
        """The batch being recorded, if any, once it is (raising its failure), with its
        ciphertext; the batches stored that its write acknowledged are let go of."""
        recording, self._recording = self._recording, None
        if recording is None:
            return None
        batch = recording.recorded.result()
        del self._stored[: recording.acknowledging]
        return batch, recording.ciphertext

    def _record(
        self,
        first: int,
        last: int,
        digests: list[tuple[Future[list[bytes]], int]],
        acknowledging: UploadState,
    ) -> _Batch:
        """On a storing thread: refuse frames `first` to `last` if sent before with other
        bytes, and write `acknowledging` with their HMACs recorded."""
        # Hashed on other threads as the frames came.
        hashes = [frame_digests.result()[place] for frame_digests, place in digests]
        macs = dict(
            zip(
                map(str, range(first, last + 1)),
                self._uploads.frame_macs(self._layout, first, hashes),
                strict=True,
            )
        )
        for number, mac in macs.items():
            recorded = self._recorded.get(number)
            if recorded is not None and not hmac.compare_digest(recorded, mac):
                raise ResentBytesDiffer(
                    f"the bytes sent for frame {number} differ from those sent before for it"
                )
        self._write(acknowledging.model_copy(update={"macs": {**acknowledging.macs, **macs}}))
        self._chain = _chained(self._chain, hashes)
        return _Batch(last, self._chain, self.state.generation)

    def _buffer(self, size: int) -> bytearray:
        """A buffer of `size` bytes to seal into: one a batch was stored from, if one is
        that size (every whole part is), else a new one. Three take turns: one sealed
        into, one recorded, one stored."""
        for spare in self._spares:
            if len(spare) == size:
                self._spares.remove(spare)
                return spare
        self._spares.clear()
        return bytearray(size)

    def _sealed_after(self, before: bytearray, first: int, frames: list[bytearray]) -> bytearray:
        """`before` followed by `frames` sealed (numbered from `first`), in one buffer
        of that size, each frame sealed in its place: a part grown frame by frame would
        be copied again at each growth."""
        total = self._layout.total_frames
        sizes = [
            len(plain) + (FINAL_OVERHEAD if number == total else REGULAR_OVERHEAD)
            for number, plain in enumerate(frames, start=first)
        ]
        sealed = self._buffer(len(before) + sum(sizes))
        view, at = memoryview(sealed), len(before)
        view[:at] = before
        for number, (plain, size) in enumerate(zip(frames, sizes, strict=True), start=first):
            into = view[at : at + size]
            self._sealer.seal_into(number, memoryview(plain), final=number == total, into=into)
            at += size
        return sealed

    def _store_batch(self, batch: _Batch, ciphertext: bytearray) -> _Stored:
        """Store a batch's ciphertext (on a storing thread): a whole part, synced with
        those before it every `SYNC_FRAMES` frames' worth of parts, or the part so far
        as the staging object (durable, but the parts before it may not be)."""
        layout = self._layout
        if layout.ends_part(batch.last):
            number = layout.part_of(batch.last)
            offset = layout.part_offset(number)
            part = self._store.put_part(layout.part_upload(), number, offset, ciphertext)
            synced = number % max(1, SYNC_FRAMES // layout.frames_per_part) == 0
            if synced:
                self._sync_parts()
            return _Stored(batch, StoredPart(**asdict(part)), 0, 0, "", synced)
        # Named by the generation that recorded its frames, which no other request
        # writes: a PATCH whose lock lapsed while it stalled writes a name of its own
        # when it wakes, never the staging object of the request that took over.
        name = staging_name(layout.id, batch.generation)
        self._uploads.records.store.put(name, bytes(ciphertext))
        digest = hashlib.sha256(ciphertext).hexdigest()
        return _Stored(batch, None, batch.generation, len(ciphertext), digest)

    def _settle(self) -> None:
        """Take the batch being stored once it is, to be acknowledged by the next write of
        the state once it is durable; raise its failure."""
        storing = self._storing
        if storing is None:
            return
        self._storing = None
        try:
            self._unsynced.append(storing.result())
        finally:
            if self._sync_failed:
                self._unsynced = []
        if self._unsynced and self._unsynced[-1].synced:
            self._stored += self._unsynced
            self._unsynced = []

    def _sync(self) -> None:
        """Make the batches stored since the last sync durable, to be acknowledged."""
        if self._unsynced:
            try:
                self._sync_parts()
            finally:
                unsynced, self._unsynced = self._unsynced, []
            self._stored += unsynced

    def _sync_parts(self) -> None:
        """Sync the parts put so far; once that fails, no later sync of this request is
        believed (`_settle` and `_sync` drop what it would cover). Linux reports a failed
        writeback once and marks its pages clean: a sync after it succeeds over bytes that
        never reached the disk. The frames stored since the last sync that succeeded keep
        their HMACs in the state, so the client sends them again and they are put again
        (the same bytes: the same ciphertext)."""
        try:
            self._store.sync_parts(self._layout.part_upload())
        except BaseException:
            self._sync_failed = True
            raise

    def _acknowledging(self, state: UploadState) -> UploadState:
        """`state` with the batches stored since the last write acknowledged."""
        if not self._stored:
            return state
        stored = self._stored[-1]
        last = stored.batch.last
        offset = state.end_of(last)
        return state.model_copy(
            update={
                "offset": offset,
                "frames": last,
                "parts": (*state.parts, *(s.part for s in self._stored if s.part is not None)),
                "staging": stored.staging,
                "staged": stored.staged,
                "staged_sha256": stored.staged_sha256,
                "chain": self._uploads._masked(state, stored.batch.chain, offset),  # noqa: SLF001
                "macs": {n: m for n, m in state.macs.items() if int(n) > last},
            }
        )

    def _acknowledge(self, *, hold: bool) -> None:
        """Write the state acknowledging what is stored, once nothing is being recorded
        or stored."""
        self._write(self._acknowledging(self.state), hold=hold)
        self._stored = []

    def _write(self, state: UploadState, *, hold: bool = True) -> None:
        """Write `state` (which acknowledges what is stored), conditional on the last
        write, renewing the lock or releasing it; then drop the staging object it no
        longer names (one a failure leaves goes when the upload ends)."""
        lock: dict[str, object] = {"lock": "", "locked_until": None}
        if hold:
            lock = {"locked_until": datetime.now(UTC) + self._uploads.lock_for}
        before = self.state
        self.state, self._etag = self._uploads._save(  # noqa: SLF001
            state.model_copy(update=lock), self._etag, before
        )
        if before.staged and before.staging != self.state.staging:
            with suppress(StorageError):
                self._uploads.records.store.delete(staging_name(before.id, before.staging))
