"""Which version of the tenant's name key a run into a prefix hides its members' names
with: the one the prefix's manifest was written under, if it has a manifest (a rerun,
with `overwrite`), so that the same paths give the same names and land on the objects the
run before wrote, whatever rotations came between; else the tenant's newest.

The version is read from the manifest's record, which is sealed, not from the manifest
itself: finding it needs no data key. A bucket writer can delete the manifest (the rerun
then names under the newest version, beside the old objects) or put back an older one of
its own place (its version is still one of the tenant's), not name a version of its own.
Nor can it make a rerun name under other material by deleting the name key record, so
that the next run issues the manifest's version number again: the record holds the
version's fingerprint too, and a version with another is refused (`NameKeyMismatch`). A
manifest from before fingerprints were recorded is refused if the version now on record
was made after it: then it cannot be the one that named it.
"""

from keystore import KeyStore
from keystore.name_keys import NameKey, NameKeyMismatch
from storage import ObjectNotFound, ObjectStore
from storage.integrity import Records
from storage.records import object_record


def prefix_name_key(
    keys: KeyStore, records: Records, store: ObjectStore, tenant: str, manifest_key: str
) -> NameKey:
    """The name key for a run whose manifest goes to `manifest_key` (a storage key):
    `RecordTampered` if a manifest is there whose record is not authentic (a version
    guessed could scatter the rerun's members under other names)."""
    try:
        manifest = object_record(records, store, manifest_key)
    except ObjectNotFound:
        return keys.name_keys.current(tenant)
    if manifest.name_key_version is None:  # a run with plain names wrote it
        return keys.name_keys.current(tenant)
    key = keys.name_keys.version(tenant, manifest.name_key_version, manifest.name_key_fingerprint)
    if manifest.name_key_fingerprint is None and key.created_at > manifest.created_at:
        raise NameKeyMismatch(
            f"the tenant's name key version {key.version} was made after the manifest "
            "that names it: its record was deleted and the version issued again"
        )
    return key
