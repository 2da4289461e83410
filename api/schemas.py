"""Request fields several routes share, validated the same way everywhere."""

from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from envelope import DEFAULT_FRAME_LENGTH as DEFAULT_FRAME_LENGTH
from envelope import InvalidParameter, check_frame_length
from sealstream.objects import RESERVED_CONTEXT_PREFIX


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

FrameLength = Annotated[int, AfterValidator(_writable_frame_length)]
"""A frame length this service writes: a multiple of 128 in [4 KiB, 16 MiB]."""
