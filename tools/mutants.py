"""`make mutants`: disable, one at a time, each guard the service's trust rests on, and
check that the tests notice.

Each mutant is one small edit to one line of a copy of the project (the checkout is never
touched); the tests named for it then run against that copy. A mutant is *killed* when
they fail, and *survives* when they pass: then nothing would notice if that guard broke.
Every mutant must be killed. The copy is imported ahead of the installed project through
PYTHONPATH, which the servers and workers the tests start inherit too.

    .venv/bin/python tools/mutants.py            # every mutant
    .venv/bin/python tools/mutants.py token      # those whose name contains "token"
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS_FAILED = 1  # pytest's exit status when tests ran and some failed


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str  # must occur exactly once in the file
    mutated: str
    tests: tuple[str, ...]


ENVELOPE_TESTS = ("tests/test_envelope_tamper.py", "tests/test_envelope_roundtrip.py")
SIGNING_TESTS = ("tests/test_keystore_signing.py",)
RETIREMENT_TESTS = ("tests/test_key_retirement.py",)
API_AUDIT_TESTS = "tests/test_api_audit.py"
REDIS_USAGE_TESTS = (
    "tests/test_key_usage.py::test_a_count_written_into_redis_past_what_the_processes_could_count_is_not_believed",
)
REDIS_RATE_TEST = (
    "tests/test_key_usage.py"
    "::test_a_count_written_into_redis_is_believed_at_most_at_the_rate_whatever_the_processes"
)
REDIS_ROTATION_TEST = (
    "tests/test_key_usage.py"
    "::test_a_version_rotates_on_its_usage_limit_at_most_once_a_checkpoint_interval"
)

FOOTER_TESTS = ("tests/test_envelope_interop.py", "tests/test_envelope_ranged.py")
AUDIT_TESTS = "tests/test_audit.py"
NAME_TAKEN_TEST = (
    f"{AUDIT_TESTS}::test_a_segment_name_taken_by_someone_else_is_an_alarm_and_the_chain_goes_on"
)
CONTEXT_KEYS_TEST = f"{AUDIT_TESTS}::test_an_event_is_small_whatever_context_keys_a_client_sends"
BYTE_BOUNDS_TEST = f"{AUDIT_TESTS}::test_the_buffer_and_each_segment_are_bounded_in_bytes"
PAGE_TEST = f"{AUDIT_TESTS}::test_a_page_reads_the_hours_it_shows_not_the_whole_trail"
KEY_EVENTS_TEST = "tests/test_api_audit.py::test_key_management_events_name_the_version_they_touch"

PROVENANCE_TESTS = ("tests/test_api_signed_messages.py",)
NAMES_TEST = "tests/test_archive_names.py"

MUTANTS = (
    Mutant(
        "every recipient key watched",
        "services/keys.py",
        "        kids = [sealing.key.kid, *(o.record.kid for o in sealing.others if o.record)]",
        "        kids = [sealing.key.kid]",
        ("tests/test_api_stream_faults.py",),
    ),
    Mutant(
        "a partner's key is public",
        "keystore/algorithms.py",
        "    if _PRIVATE_MEMBERS & set(public_jwk):\n"
        '        raise InvalidJwk("send the public key only: the JWK holds private members")\n',
        "",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "a recipient named once",
        "api/schemas.py",
        "        if len(set(self.kids)) != len(self.kids):",
        "        if False:",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "proof checked",
        "services/provenance.py",
        "        if not hmac.compare_digest(_decoded(mac), self._mac(binding)):",
        "        if False:",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "unproven refused",
        "services/provenance.py",
        "        if refuse_unproven:",
        "        if False:",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "another deployment's proof unproven",
        "services/provenance.py",
        "        if proof_format != PROOF_FORMAT or key_id != self.key_id:",
        "        if proof_format != PROOF_FORMAT:",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "a proof of the first form proves signed messages only",
        "services/provenance.py",
        "            return Verdict(whole=header.signed, any_part=False)",
        "            return Verdict(whole=True, any_part=False)",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "a range proven only for keys held here alone, never for a signature",
        "services/provenance.py",
        "        return Verdict(whole=header.signed or only_here, any_part=only_here)",
        "        return Verdict(whole=header.signed or only_here, any_part=True)",
        ("tests/test_api_object_reads.py",),
    ),
    Mutant(
        "a range not proven by its record",
        "api/routes/crypto.py",
        "        **proven_header(checked.proven if wanted is None else checked.range_proven),",
        "        **proven_header(checked.proven),",
        ("tests/test_api_object_reads.py",),
    ),
    Mutant(
        "unsigned content proven only for keys held here alone",
        "services/keys.py",
        "        if record.may_be_known_outside:",
        "        if False:",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "signed when a recipient's key may be known outside",
        "services/keys.py",
        "        signed=signed or known_outside(record, others),",
        "        signed=signed,",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "recipients bound by the proof",
        "envelope/message.py",
        '            struct.pack(">H", len(recipients)),\n'
        '            *(_counted(provider.encode("utf-8")) + _counted(name)'
        " for provider, name in recipients),\n",
        "",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "ranged reads say the footer went unchecked",
        "api/routes/crypto.py",
        "    if checked.opened.header.signed:",
        "    if False:",
        PROVENANCE_TESTS,
    ),
    Mutant(
        "footer signature",
        "envelope/footer.py",
        "            raise FooterAuthenticationError(",
        "            return  # (",
        FOOTER_TESTS,
    ),
    Mutant(
        "footer required",
        "envelope/decrypt.py",
        "        if self._footer is not None and not self._footer.verified:",
        "        if False:",
        FOOTER_TESTS,
    ),
    Mutant(
        "footer length bound",
        "envelope/footer.py",
        "    if not 0 < length <= MAX_SIGNATURE_LENGTH:",
        "    if False:",
        FOOTER_TESTS,
    ),
    Mutant(
        "ranged footer form",
        "envelope/ranged.py",
        "        if 2 + footer_signature_length(footer) != len(footer):",
        "        if False:",
        FOOTER_TESTS,
    ),
    Mutant(
        "public key pair only in signed suites",
        "envelope/header.py",
        "    if is_signed(suite_id) != (PUBLIC_KEY_CONTEXT_KEY in context):",
        "    if False:",
        FOOTER_TESTS,
    ),
    Mutant(
        "commitment check",
        "envelope/message.py",
        "if not hmac.compare_digest(keys.commitment, header.commitment):",
        "if False:",
        ENVELOPE_TESTS,
    ),
    Mutant(
        "header tag",
        "envelope/message.py",
        "    FrameOpener(keys.encryption_key, header.message_id)"
        ".verify_header_tag(header.body, header.tag)\n",
        "",
        ENVELOPE_TESTS,
    ),
    Mutant(
        "header tag once",
        "envelope/frames.py",
        "        if self._header_tagged:",
        "        if False:",
        ("tests/test_envelope_fences.py",),
    ),
    Mutant(
        "frame IV",
        "envelope/frames.py",
        "    if iv != frame_iv(sequence_number):",
        "    if False:",
        ENVELOPE_TESTS,
    ),
    Mutant(
        "frame sequence",
        "envelope/decrypt.py",
        "        if sequence_number != self.next_sequence_number:",
        "        if False:",
        ENVELOPE_TESTS,
    ),
    Mutant(
        "final frame",
        "envelope/decrypt.py",
        "        if not self.frames.final_frame_read:\n            raise",
        "        if False:\n            raise",
        ENVELOPE_TESTS,
    ),
    Mutant(
        "required context",
        "envelope/message.py",
        "    missing = missing_pairs(header.context, required_context or {})",
        "    missing: list[str] = []",
        (*ENVELOPE_TESTS, "tests/test_api_stream.py"),
    ),
    Mutant(
        "ranged read: final frame read",
        "services/objects.py",
        "            return check.layout()\n",
        "            return claimed\n",
        ("tests/test_api_object_reads.py", "tests/test_envelope_ranged.py"),
    ),
    Mutant(
        "ranged read: final frame vouches",
        "envelope/ranged.py",
        "        if vouched.message_length != claimed.message_length:",
        "        if False:",
        ("tests/test_api_object_reads.py", "tests/test_envelope_ranged.py"),
    ),
    Mutant(
        "ranged read: span ends in it",
        "envelope/ranged.py",
        "        if self._frames.final_frame_read != self._final:",
        "        if False:",
        ("tests/test_api_object_reads.py", "tests/test_envelope_ranged.py"),
    ),
    Mutant(
        "object placement",
        "services/objects.py",
        "    if named is not None and named != storage_key:",
        "    if False:",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "scope check",
        "api/auth.py",
        "        if scope not in principal.scopes:",
        "        if False:",
        ("tests/test_api_keys.py",),
    ),
    Mutant(
        "token secret",
        "api/tokens.py",
        "if record is None or not hmac.compare_digest(digest, record.hash):",
        "if record is None:",
        ("tests/test_trust_records.py", "tests/test_api_keys.py"),
    ),
    Mutant(
        "token revocation",
        "api/tokens.py",
        "        if record.revoked_at is not None:",
        "        if False:",
        ("tests/test_api_keys.py",),
    ),
    Mutant(
        "token expiry",
        "api/tokens.py",
        "if record.expires_at is not None and record.expires_at <= self._clock():",
        "if False:",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "token id MAC",
        "api/tokens.py",
        "        return hmac.compare_digest(tag, self._tag(random_part))",
        "        return True",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "tenant prefix",
        "services/placement.py",
        "return Placement(store, store.bucket, ref.key, tenant_prefix(tenant) + ref.key)",
        'return Placement(store, store.bucket, ref.key, "tenants/default/" + ref.key)',
        ("tests/test_api_stream.py", "tests/test_jobs_batch.py"),
    ),
    Mutant(
        "record MAC",
        "storage/integrity.py",
        "    if not hmac.compare_digest(mac, key.mac(kind, name, canonical)):",
        "    if False:",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "tenant admin: other tenants",
        "api/routes/admin.py",
        "    if spec.tenant != principal.tenant and not principal.operator:",
        "    if False:",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "tenant admin: scopes held",
        "api/routes/admin.py",
        "    beyond = sorted(set(spec.scopes) - principal.scopes)",
        "    beyond: list[str] = []",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "tenant admin: listing",
        "api/routes/admin.py",
        "    if not principal.operator:\n        if tenant not in (None, principal.tenant):",
        "    if False:\n        if tenant not in (None, principal.tenant):",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "tenant admin: tokens it manages",
        "api/routes/admin.py",
        "    return record.tenant == principal.tenant and set(record.scopes) <= principal.scopes",
        "    return True",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "stored object: the recorded message",
        "services/objects.py",
        "    if recorded.header_sha256 != header_digest(header):",
        "    if False:",
        ("tests/test_trust_records.py",),
    ),
    Mutant(
        "audit: the sweeps wait for the trail",
        "workers/lifecycle.py",
        "    if not audit.writable():",
        "    if False:",
        (f"{API_AUDIT_TESTS}::test_the_sweeps_destroy_nothing_the_audit_cannot_record_first",),
    ),
    Mutant(
        "audit: a key is destroyed only once announced",
        "keystore/store.py",
        "            if not proceed(record.tenant, record.kid):",
        "            if False:",
        (f"{API_AUDIT_TESTS}::test_the_sweeps_destroy_nothing_the_audit_cannot_record_first",),
    ),
    Mutant(
        "audit: a job starts only once the trail is written",
        "workers/execution.py",
        "    if not services.audit.writable():",
        "    if False:",
        (f"{API_AUDIT_TESTS}::test_a_job_waits_while_the_audit_cannot_be_written",),
    ),
    Mutant(
        "key usage: maxUsageLimit",
        "keystore/usage.py",
        "    if record.usage_exhausted(uses):",
        "    if False:",
        ("tests/test_key_usage.py",),
    ),
    Mutant(
        "key usage: maxUsageLimit stops signatures too",
        "keystore/usage.py",
        "                    if operation in MAKING:",
        '                    if operation == "encrypt":',
        (
            "tests/test_api_signing.py::test_signatures_count_as_uses_and_stop_at_the_max_usage_limit",
        ),
    ),
    Mutant(
        "key usage: the random-IV wrap limit",
        "keystore/usage.py",
        "    if worn_out(record, uses, version):",
        "    if False:",
        ("tests/test_key_usage.py",),
    ),
    Mutant(
        "key usage: counts never go back",
        "keystore/records.py",
        "        counted = self.uses.at_least(floor).plus(added)",
        "        counted = self.uses.plus(added)",
        ("tests/test_key_usage.py",),
    ),
    Mutant(
        "key usage: a Redis count read afresh is held to the sealed record",
        "keystore/usage_redis.py",
        "        if jump > self._allowance(record, self._saved.now()):",
        "        if False:",
        REDIS_USAGE_TESTS,
    ),
    Mutant(
        "key usage: a Redis count is held to the rate since the last one believed",
        "keystore/usage_redis.py",
        "                if _jump(state.vouched, shared) <= self._max_rate * unchecked"
        " + added.total:",
        "                if True:",
        REDIS_USAGE_TESTS,
    ),
    Mutant(
        "key usage: a checkpoint refuses an implausible Redis count",
        "keystore/usage_redis.py",
        "            if _jump(stored.uses, shared) > self._allowance(stored, now) + added.total:",
        "            if False:",
        REDIS_USAGE_TESTS,
    ),
    Mutant(
        "key usage: the local KEK's wrap limit",
        "keystore/kek_wraps.py",
        "            if wraps >= WRAP_LIMIT:",
        "            if False:",
        ("tests/test_key_usage.py",),
    ),
    Mutant(
        "stored object: a record required",
        "services/open_stored.py",
        "        if serve_unrecorded:\n            return None",
        "        return None",
        ("tests/test_api_object_reads.py",),
    ),
    Mutant(
        "intent: only over an older record",
        "storage/records.py",
        "    if intent.generation > recorded.generation:",
        "    if True:",
        (
            "tests/test_trust_intents.py"
            "::test_an_older_write_put_back_with_its_intent_is_refused_and_not_recorded",
        ),
    ),
    Mutant(
        "intent: a write after a deletion outnumbers those before",
        "storage/records.py",
        "    return max(after + 1, time.time_ns() // 1000)",
        "    return after + 1",
        (
            "tests/test_trust_intents.py"
            "::test_an_older_write_put_back_with_its_intent_is_refused_and_not_recorded",
        ),
    ),
    Mutant(
        "stored object: whole plaintext against its record",
        "services/open_stored.py",
        "            check_recorded_plaintext(size, digest.hexdigest(), recorded, name_keys)",
        "            pass",
        (
            "tests/test_api_object_reads.py"
            "::test_other_frames_under_the_stored_header_abort_a_whole_read",
        ),
    ),
    Mutant(
        "stored object: last piece held back",
        "services/open_stored.py",
        "        if held:\n            yield held\n        held = piece",
        "        yield piece",
        (
            "tests/test_api_object_reads.py"
            "::test_other_frames_under_the_stored_header_abort_a_whole_read",
        ),
    ),
    Mutant(
        "reencrypt: other recipients kept",
        "services/reencrypt.py",
        "            more_kids=other_recipients(header, recorded.kid, kid or recorded.kid),",
        "            more_kids=(),",
        (
            "tests/test_api_reencrypt.py"
            "::test_an_object_for_several_keys_keeps_every_other_key_when_reencrypted",
        ),
    ),
    Mutant(
        "signature alg from the key",
        "envelope/jws.py",
        "        if jws.alg != key.alg:",
        "        if False:",
        SIGNING_TESTS,
    ),
    Mutant(
        "signature crit b64",
        "envelope/jws.py",
        "    if crit is None or UNENCODED not in crit:",
        "    if False:",
        SIGNING_TESTS,
    ),
    Mutant(
        "ml-dsa mu with the empty context",
        "envelope/signing_keys.py",
        "        return mldsa.MLDSAMuHasher(self._key)",
        '        return mldsa.MLDSAMuHasher(self._key, b"context")',
        SIGNING_TESTS,
    ),
    Mutant(
        "ml-dsa verify before answering",
        "envelope/signing_keys.py",
        "            self.public.verify(signature, digest)",
        "            pass",
        SIGNING_TESTS,
    ),
    Mutant(
        "resign verifies the old signature",
        "services/signing.py",
        "    await to_thread.run_sync(verifying.verifier.verify)",
        "    pass",
        ("tests/test_api_signing.py",),
    ),
    Mutant(
        "reencrypt waits for the source's final frame",
        "services/open_upload.py",
        "    decryptor.finish()\n",
        "",
        ("tests/test_api_reencrypt.py",),
    ),
    Mutant(
        "members: no more in flight than the limit",
        "services/archives/sealing.py",
        "        self._slots.acquire()\n",
        "",
        ("tests/test_parallel_sealing.py",),
    ),
    Mutant(
        "members: a reader a few chunks ahead at most",
        "services/archives/sealing.py",
        "queue.Queue(FEED_DEPTH)",
        "queue.Queue()",
        ("tests/test_parallel_sealing.py",),
    ),
    Mutant(
        "members: a rerun rewrites what it claimed",
        "workers/batch.py",
        "    if placement.storage_key not in resumed.claims:",
        "    if True:",
        ("tests/test_jobs_batch.py::test_a_rerun_after_a_crash_seals_each_member_once",),
    ),
    Mutant(
        "members: a rerun leaves another writer's object where it claimed",
        "workers/batch.py",
        "    if _writer(services, placement, stored) != writer_id(context):",
        "    if False:",
        (
            "tests/test_jobs_batch.py"
            "::test_a_rerun_leaves_what_another_writer_put_where_it_had_claimed",
        ),
    ),
    Mutant(
        "members: a rerun rewrites its own object only as it found it",
        "workers/batch.py",
        "    return _Write(overwrite=True, replacing=stored.etag)",
        "    return _Write(overwrite=True)",
        ("tests/test_jobs_batch.py::test_a_rerun_rewrites_its_own_object_only_as_it_found_it",),
    ),
    Mutant(
        "jobs: a task's copy of a record expires",
        "services/jobs/store.py",
        "        if datetime.now(UTC) >= copy.expires_at:",
        "        if False:",
        ("tests/test_jobs_store.py", "tests/test_jobs_task_copies.py"),
    ),
    Mutant(
        "members: a stale record file goes",
        "services/seal_to_storage.py",
        "        if replaced is not None:  # a record file of the object replaced would be stale",
        "        if False:",
        ("tests/test_archive_member_records.py",),
    ),
    Mutant(
        "index: a marker before the object",
        "services/seal_to_storage.py",
        "        ours = self._mark(marker)",
        "        ours = False",
        ("tests/test_api_objects.py",),
    ),
    Mutant(
        "index: a run's marker before its members",
        "services/inventory.py",
        "                    self._records.put(RUN_MARKER_KIND, run.name, run, if_absent=True)",
        "                    pass",
        ("tests/test_inventory_runs.py",),
    ),
    Mutant(
        "index: a run's member drops the replaced object's own marker",
        "services/seal_to_storage.py",
        "        elif replaced is not None:",
        "        elif False:",
        ("tests/test_inventory_runs.py",),
    ),
    Mutant(
        "index: a run's settled count only while its prefix is unchanged",
        "services/inventory.py",
        "            run.members if run.members is not None and run.listing == digest else None",
        "            run.members if run.members is not None else None",
        ("tests/test_inventory_runs.py",),
    ),
    Mutant(
        "index: a count notes its figure only where every object had a record",
        "services/inventory.py",
        "        if complete:",
        "        if True:",
        ("tests/test_inventory_runs.py",),
    ),
    Mutant(
        "index: a record file of another version of the object is not believed",
        "services/inventory.py",
        "    return record if record.etag == stored.etag else None",
        "    return record",
        ("tests/test_inventory_runs.py",),
    ),
    Mutant(
        "index: a count notes its figure only over the marker it read",
        "services/inventory.py",
        "            self._records.put(RUN_MARKER_KIND, run.name, settled, if_match=etag)",
        "            self._records.put(RUN_MARKER_KIND, run.name, settled)",
        ("tests/test_inventory_runs.py",),
    ),
    Mutant(
        "index: a run settles only where every object had a record",
        "services/inventory.py",
        "        if not complete:",
        "        if False:",
        ("tests/test_inventory_runs.py",),
    ),
    Mutant(
        "index: a run stands for its own job's objects",
        "services/inventory.py",
        "            record.job_id == self.job_id",
        "            True",
        ("tests/test_inventory_runs.py",),
    ),
    Mutant(
        "retire: the index says in use",
        "services/retirement.py",
        "        if counts.get(version):",
        "        if False:",
        RETIREMENT_TESTS,
    ),
    Mutant(
        "retire: the census",
        "services/retirement.py",
        "        self.require_unused(tenant, kid, version)\n",
        "",
        RETIREMENT_TESTS,
    ),
    Mutant(
        "retire: objects without a record",
        "services/retirement.py",
        "    return _Verdict.SEALED_FOR if name in key_names(header) else _Verdict.NOT",
        "    return _Verdict.NOT",
        RETIREMENT_TESTS,
    ),
    Mutant(
        "retire: a refused record is unknown",
        "services/retirement.py",
        "    except RecordTampered:\n        return _Verdict.REFUSED",
        "    except RecordTampered:\n        return _Verdict.NOT",
        RETIREMENT_TESTS,
    ),
    Mutant(
        "retire: a file whose metadata was deleted is unknown",
        "services/retirement.py",
        "        unlisted=store.unlisted(prefix),",
        "        unlisted=0,",
        (f"{RETIREMENT_TESTS[0]}::test_nor_does_an_object_stripped_of_record_marker_and_metadata",),
    ),
    Mutant(
        "retire: an unreadable message header is unknown",
        "services/retirement.py",
        "        return _Verdict.UNREADABLE",
        "        return _Verdict.NOT",
        (
            f"{RETIREMENT_TESTS[0]}::test_nor_does_an_object_stripped_of_record_marker_and_metadata",
            f"{RETIREMENT_TESTS[0]}"
            "::test_nor_does_an_object_stripped_of_record_and_marker_and_its_first_byte_changed",
        ),
    ),
    Mutant(
        "retire: destruction waits for the census",
        "services/retirement.py",
        "        if indexed is None or indexed or census.objects or census.unknown:",
        "        if False:",
        RETIREMENT_TESTS,
    ),
    Mutant(
        "retire: only a destruction done is reported (and audited)",
        "services/retirement.py",
        "and self.keys.destroy_version(tenant, kid, version)\n",
        "and bool([self.keys.destroy_version(tenant, kid, version)])\n",
        (
            f"{RETIREMENT_TESTS[0]}"
            "::test_a_destruction_another_sweep_did_meanwhile_is_not_reported_again",
        ),
    ),
    Mutant(
        "redis usage: the bound runs from the sealed checkpoint's time",
        "keystore/usage_redis.py",
        "        return self._max_rate * (record.counts_since(now) + self._flush_interval)",
        "        return self._max_rate * (self._interval + self._flush_interval)",
        (REDIS_RATE_TEST,),
    ),
    Mutant(
        "redis usage: a checkpoint seals its time",
        "keystore/usage_redis.py",
        "            return stored.checkpointing(shared, now)",
        "            return stored.counting(shared, Uses())",
        (REDIS_RATE_TEST,),
    ),
    Mutant(
        "redis usage: a young version does not rotate on its usage limit",
        "keystore/store.py",
        "            if now - stored.primary.created_at < self._usage_rotation_age:",
        "            if False:",
        (REDIS_ROTATION_TEST,),
    ),
    Mutant(
        "retired version opens nothing",
        "keystore/store.py",
        "            record.version(needs_version).check_in_use(kid)",
        "            pass",
        RETIREMENT_TESTS,
    ),
    Mutant(
        "retired version's keyring withheld",
        "keystore/store.py",
        "        live = [version for version in record.versions if version.retired_at is None]",
        "        live = list(record.versions)",
        ("tests/test_keystore.py",),
    ),
    Mutant(
        "audit: segment signatures",
        "audit/verify.py",
        "signed = _signed(chain_name, checkpoint, public_keys)",
        "signed = True",
        ("tests/test_audit.py",),
    ),
    Mutant(
        "audit: the hash chain against the signed digest",
        "audit/verify.py",
        'if chain.digest is not None and b64(chain.digest) != checkpoint.get("digest"):',
        "if False:",
        ("tests/test_audit.py",),
    ),
    Mutant(
        "audit: a chain the sink has no checkpoint of",
        "audit/verify.py",
        "    for chain_name in sorted(set(walked) - set(latest)):",
        "    for chain_name in []:",
        ("tests/test_audit.py",),
    ),
    Mutant(
        "audit: a chain short of its checkpoint",
        "audit/verify.py",
        "        elif seq >= chain.next_seq:",
        "        elif False:",
        ("tests/test_audit.py",),
    ),
    Mutant(
        "audit: events read back are authenticated",
        "audit/reading.py",
        'return hmac.compare_digest(unb64(event.get("mac")), event_mac(audit_key, event))',
        "return True",
        ("tests/test_audit.py",),
    ),
    Mutant(
        "audit: fail closed",
        "api/auth.py",
        "        if needs_audit and services(request).audit.refuses_requests():",
        "        if False:",
        ("tests/test_api_audit.py",),
    ),
    Mutant(
        "client: cancelling an async call aborts its transfer",
        "sealstream_client/aio.py",
        "            cancellation.cancel()\n",
        "",
        ("tests/test_client_async.py",),
    ),
    Mutant(
        "audit: verify tells an unanchored pass apart",
        "sealstream/commands.py",
        "    if not report.anchored:",
        "    if False:",
        (f"{AUDIT_TESTS}::test_the_audit_commands_verify_with_the_kek_or_the_exported_public_key",),
    ),
    Mutant(
        "audit: a segment name taken is written around",
        "audit/trail.py",
        "                if self._holds(segment):",
        "                if True:",
        (NAME_TAKEN_TEST,),
    ),
    Mutant(
        "audit: an alarm in the chain is a finding",
        "audit/verify.py",
        '        if event.get("type") == ALARM:',
        "        if False:",
        (NAME_TAKEN_TEST,),
    ),
    Mutant(
        "audit: over-long text kept as its MAC",
        "audit/trail.py",
        "if isinstance(value, str) and len(value) * 12 > limit",
        "if False",
        (CONTEXT_KEYS_TEST,),
    ),
    Mutant(
        "audit: context keys capped",
        "audit/trail.py",
        "for name in names[:MAX_CONTEXT_KEYS]]",
        "for name in names]",
        (CONTEXT_KEYS_TEST,),
    ),
    Mutant(
        "audit: segments bounded in bytes",
        "audit/trail.py",
        "(size + item.size > limit or ",
        "(",
        (BYTE_BOUNDS_TEST,),
    ),
    Mutant(
        "audit: buffer bounded in bytes",
        "audit/trail.py",
        "                or self._buffered + waiting.size > self.options.buffer_bytes",
        "                or False",
        (BYTE_BOUNDS_TEST,),
    ),
    Mutant(
        "audit: a segment's worth of bytes flushes at once",
        "audit/trail.py",
        "                or self._buffered >= self.options.segment_bytes",
        "                or False",
        (f"{AUDIT_TESTS}::test_a_segments_worth_of_bytes_waiting_flushes_at_once",),
    ),
    Mutant(
        "audit: a page stops once full",
        "audit/reading.py",
        "if page.full_before(name.hour) or (last_hour",
        "if (last_hour",
        (PAGE_TEST,),
    ),
    Mutant(
        "audit: a page lists from its range's start",
        "audit/reading.py",
        "_listed(store, _first_hour(query, after))",
        '_listed(store, "")',
        (PAGE_TEST,),
    ),
    Mutant(
        "audit: an object too large for a segment is not read",
        "audit/chain.py",
        "if size > LARGEST_SEGMENT:",
        "if False:",
        (f"{AUDIT_TESTS}::test_an_object_too_large_for_a_segment_is_one_alarm_and_is_never_read",),
    ),
    Mutant(
        "audit: a segment is refused from its first forged event",
        "audit/reading.py",
        """RecordTampered("an audit segment", name.key))
            break""",
        """RecordTampered("an audit segment", name.key))
            continue""",
        (f"{AUDIT_TESTS}::test_a_segment_of_forged_events_is_refused_once_not_per_event",),
    ),
    Mutant(
        "audit: a checkpoint with no canonical form is unsigned",
        "audit/signing.py",
        "except (InvalidSignature, ValueError, TypeError):",
        "except InvalidSignature:",
        (f"{AUDIT_TESTS}::test_a_checkpoint_with_no_canonical_form_is_forged_not_a_crash",),
    ),
    Mutant(
        "audit: a page reads a bounded number of segments",
        "audit/reading.py",
        "if read >= query.segments:",
        "if False:",
        (
            f"{AUDIT_TESTS}::test_a_page_reads_a_bounded_number_of_segments_and_goes_on_with_a_cursor",
        ),
    ),
    Mutant(
        "audit: a cursor's time is checked",
        "audit/reading.py",
        "if not within_years(datetime.fromisoformat(moment)):",
        "if False:",
        (f"{AUDIT_TESTS}::test_a_cursor_with_a_time_out_of_range_or_without_offset_is_invalid",),
    ),
    Mutant(
        "audit: a deletion names its object",
        "api/routes/objects.py",
        "    note.object = key",
        "    note.object = None",
        (
            f"{API_AUDIT_TESTS}::test_deleting_an_object_names_it_and_the_key_version_it_was_sealed_under",
        ),
    ),
    Mutant(
        "local store: a sidecar not as written is missing",
        "storage/local.py",
        "        if not _sidecar_shaped(sidecar):",
        "        if False:",
        ("tests/test_storage_local.py",),
    ),
    Mutant(
        "audit: a tenant's range is bounded",
        "api/routes/audit.py",
        "    if not principal.operator:",
        "    if False:",
        ("tests/test_api_audit.py::test_tenants_read_their_own_events_and_the_operator_reads_all",),
    ),
    Mutant(
        "audit: a lost signing key is not remade",
        "audit/signing.py",
        "            self._check_no_trail()",
        "            pass",
        (f"{AUDIT_TESTS}::test_a_deleted_signing_key_is_tampering_not_a_reason_to_make_one",),
    ),
    Mutant(
        "audit: key events name the version made",
        "api/routes/keys.py",
        '    noted(request).key = f"{record.kid}#{record.primary_version}"',
        "    pass",
        (KEY_EVENTS_TEST,),
    ),
    Mutant(
        "audit: an export names the version exported",
        "api/routes/keys.py",
        '    noted(request).key = str(jwk["kid"])  # kid#version: the version exported',
        "    pass",
        (KEY_EVENTS_TEST,),
    ),
    Mutant(
        "hashing pool renewed in a forked child",
        "storage/pools.py",
        "        os.register_at_fork(after_in_child=self._renew)",
        "        pass",
        ("tests/test_seal_hashing.py",),
    ),
    Mutant(
        "hidden plaintext MAC",
        "services/objects.py",
        "    if not hmac.compare_digest(expected, recorded.plaintext_mac):",
        "    if False:",
        (f"{NAMES_TEST}::test_a_bucket_writer_cannot_swap_or_alter_hidden_objects",),
    ),
    Mutant(
        "hidden name's place",
        "keystore/name_keys.py",
        "        return [self.tenant.encode(), bucket.encode(), prefix.encode()]",
        "        return [self.tenant.encode()]",
        (f"{NAMES_TEST}::test_names_are_hidden_found_again_and_mapped_back",),
    ),
    Mutant(
        "hidden names: a rerun names under its manifest's version",
        "services/archives/naming.py",
        "    if manifest.name_key_version is None:  # a run with plain names wrote it",
        "    if True:",
        ("tests/test_archive_name_rotation.py",),
    ),
    Mutant(
        "hidden names: a version of other material than recorded is refused",
        "keystore/name_keys.py",
        "        if fingerprint is not None and not hmac.compare_digest("
        "key.fingerprint, fingerprint):",
        "        if False:",
        ("tests/test_archive_name_rotation.py",),
    ),
    Mutant(
        "hidden names: a rotation past the most versions is refused",
        "keystore/name_keys.py",
        "            if record is not None and len(record.versions) >= self._max_versions:",
        "            if False:",
        ("tests/test_archive_name_rotation.py",),
    ),
    Mutant(
        "hidden names: a manifest without a fingerprint refuses a version made after it",
        "services/archives/naming.py",
        "    if manifest.name_key_fingerprint is None and key.created_at > manifest.created_at:",
        "    if False:",
        ("tests/test_archive_name_rotation.py",),
    ),
    Mutant(
        "hidden names: a job keeps the version it was created with",
        "workers/batch.py",
        "    if params.name_key_version is None:",
        "    if True:",
        ("tests/test_archive_name_rotation.py",),
    ),
)


def copy_project(target: Path) -> None:
    """The tracked files of the checkout, as they are now, into `target`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def mutate(copy: Path, mutant: Mutant) -> None:
    path = copy / mutant.path
    text = path.read_text()
    if text.count(mutant.original) != 1:
        raise SystemExit(f"{mutant.name}: its line is not in {mutant.path} exactly once")
    mutated = text.replace(mutant.original, mutant.mutated)
    compile(mutated, mutant.path, "exec")  # a mutant that does not parse proves nothing
    path.write_text(mutated)


def run(mutant: Mutant, workers: str) -> tuple[bool, float]:
    """Whether the mutant was killed, and how long its tests took."""
    with tempfile.TemporaryDirectory(prefix="sealstream-mutant-") as directory:
        copy = Path(directory)
        copy_project(copy)
        mutate(copy, mutant)
        environment = {**os.environ, "PYTHONPATH": str(copy)}
        started = time.monotonic()
        # No -x: under xdist, a stop at the first failure exits as "interrupted" (2).
        pytest = ["-m", "pytest", "-q", "-n", workers, "-p", "no:cacheprovider"]
        result = subprocess.run(
            [sys.executable, *pytest, *mutant.tests],
            cwd=copy,
            env=environment,
            capture_output=True,
            check=False,
        )
        if result.returncode not in (0, TESTS_FAILED):
            tail = result.stdout.decode(errors="replace")[-2000:]
            raise SystemExit(f"{mutant.name}: pytest could not run the tests:\n{tail}")
        return result.returncode == TESTS_FAILED, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("select", nargs="?", default="", help="run mutants whose name has this")
    parser.add_argument("--workers", default="2", help="pytest-xdist workers per mutant")
    options = parser.parse_args()
    chosen = [m for m in MUTANTS if options.select in m.name]
    survived = []
    width = max(len(mutant.name) for mutant in chosen)
    print(f"{'mutant':<{width}} {'verdict':<9} seconds  tests")
    for mutant in chosen:
        killed, seconds = run(mutant, options.workers)
        verdict = "killed" if killed else "SURVIVED"
        print(
            f"{mutant.name:<{width}} {verdict:<9} {seconds:7.1f}  {' '.join(mutant.tests)}",
            flush=True,
        )
        if not killed:
            survived.append(mutant.name)
    if survived:
        raise SystemExit(
            f"{len(survived)} of {len(chosen)} mutants survived: {', '.join(survived)}"
        )
    print(f"all {len(chosen)} mutants killed")


if __name__ == "__main__":
    main()
