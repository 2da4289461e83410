"""Request fields several routes share, validated the same way everywhere."""

from typing import Annotated, Any, Self

from pydantic import AfterValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from envelope import DEFAULT_FRAME_LENGTH as DEFAULT_FRAME_LENGTH
from envelope import DEFAULT_LIMITS, InvalidParameter, check_frame_length
from envelope.message import FRAME_LENGTH_MULTIPLE
from keystore.records import KID_PATTERN
from services.keys import RESERVED_CONTEXT_PREFIX
from storage.documents import CamelModel


def _no_reserved_keys(context: dict[str, str]) -> dict[str, str]:
    reserved = sorted(key for key in context if key.startswith(RESERVED_CONTEXT_PREFIX))
    if reserved:
        raise PydanticCustomError(
            "reserved-context-key",
            "encryption context keys starting 'sealstream:' are the service's: {keys}",
            {"keys": ", ".join(reserved)},
        )
    return context


def _writable_frame_length(frame_length: int) -> int:
    try:
        check_frame_length(frame_length)
    except InvalidParameter as exc:
        raise PydanticCustomError("invalid-frame-length", str(exc)) from None
    return frame_length


ClientContext = Annotated[
    dict[str, str], AfterValidator(_no_reserved_keys), Field(default_factory=dict)
]
"""An encryption context from a client: string pairs, none in the service's namespace."""

FrameLength = Annotated[
    int,
    AfterValidator(_writable_frame_length),
    Field(
        json_schema_extra={
            "multipleOf": FRAME_LENGTH_MULTIPLE,
            "minimum": DEFAULT_LIMITS.min_frame_length,
            "maximum": DEFAULT_LIMITS.max_frame_length,
        }
    ),
]
"""A frame length this service writes: a multiple of 128 in [4 KiB, 16 MiB]."""

Kid = Annotated[
    str,
    Field(json_schema_extra={"pattern": f"^{KID_PATTERN.pattern}$", "examples": ["mySymKey"]}),
]
"""A key's id as a request names it (checked by the key store, which gives it its own code)."""


class Metadata(CamelModel):
    """A form's `metadata` part: only the fields its route names."""

    model_config = ConfigDict(extra="forbid")


class _RequiresKid(Metadata):
    """Metadata that must name a key: `kid`."""

    @model_validator(mode="before")
    @classmethod
    def kid_is_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kid" not in data:
            raise PydanticCustomError("missing-kid", "the metadata must name a key: 'kid'")
        return data


class NamesKey(_RequiresKid):
    """Metadata that must name the key to seal or sign with: `kid`."""

    kid: Kid


class NamesKeys(_RequiresKid):
    """Metadata that names the key, or the keys, to seal with: `kid`, one or a list."""

    kid: (
        Kid
        | Annotated[
            list[Kid], Field(min_length=1, max_length=DEFAULT_LIMITS.max_encrypted_data_keys)
        ]
    )

    @property
    def kids(self) -> list[str]:
        return [self.kid] if isinstance(self.kid, str) else list(self.kid)

    @model_validator(mode="after")
    def distinct_keys(self) -> Self:
        if len(set(self.kids)) != len(self.kids):
            raise PydanticCustomError("duplicate-recipient", "'kid' names a key twice")
        return self
