"""Documents serialised as camelCase JSON: Python names in code, camelCase names in JSON,
both accepted on input.

Every model the service stores or answers with follows that convention: storage's object
records, the key store's documents, tokens, job records, and the API's requests and
answers. It is defined once, here, because storage is the lowest package that holds such
documents: the key store builds on storage, and the services, the workers and the API on
both, so all of them can share this one base, while storage imports nothing above it.
"""

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    """A document serialised as camelCase JSON."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class FrozenCamelModel(CamelModel):
    """A camelCase document that, once made, never changes: records, as they were sealed."""

    model_config = ConfigDict(frozen=True)
