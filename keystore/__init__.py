"""keystore: key records, versions, generation, KEK wrapping, persistence and a short cache.

`KeyStore` is the service; `LocalKek` and `KmsKek` wrap material at rest; `KeySpec` and
`ImportSpec` are what a new key is made from; `KeyRecord` is the stored record and
`KeyView` the part of it anyone allowed to read the key may see. Errors come from one
hierarchy rooted at `KeystoreError`, each with a stable `code`.

Exported here is what other packages use; the rest is imported from its own module.
"""

from keystore.algorithms import KeyParams, costly_material, supported_algorithms
from keystore.counts import Uses
from keystore.errors import (
    ConcurrentUpdate,
    ExportabilityIsOneWay,
    InvalidArgument,
    InvalidKeyState,
    KekError,
    KeyExists,
    KeyMismatch,
    KeyNotExportable,
    KeyNotFound,
    KeystoreError,
    KeyUsageExhausted,
    KeyVersionRetired,
    OperationNotPermitted,
    PrimaryVersion,
)
from keystore.kek import Kek, KmsKek, LocalKek
from keystore.persistence import record_key
from keystore.recordkey import KekMismatch, StoreNeedsUpgrade
from keystore.records import ImportSpec, KeyChange, KeyRecord, KeySpec, KeyView
from keystore.store import KeyStore
from keystore.usage import UsageUnavailable

__all__ = [
    "ConcurrentUpdate",
    "ExportabilityIsOneWay",
    "ImportSpec",
    "InvalidArgument",
    "InvalidKeyState",
    "Kek",
    "KekError",
    "KekMismatch",
    "KeyChange",
    "KeyExists",
    "KeyMismatch",
    "KeyNotExportable",
    "KeyNotFound",
    "KeyParams",
    "KeyRecord",
    "KeySpec",
    "KeyStore",
    "KeyUsageExhausted",
    "KeyVersionRetired",
    "KeyView",
    "KeystoreError",
    "KmsKek",
    "LocalKek",
    "OperationNotPermitted",
    "PrimaryVersion",
    "StoreNeedsUpgrade",
    "UsageUnavailable",
    "Uses",
    "costly_material",
    "record_key",
    "supported_algorithms",
]
