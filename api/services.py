"""The long-lived parts a running API holds, built once at startup and shared by requests."""

from dataclasses import dataclass

from fastapi import Request

from api.tokens import TokenStore
from keystore import KeyStore
from sealstream.settings import Settings
from storage import ObjectStore


@dataclass(frozen=True)
class Services:
    settings: Settings
    objects: ObjectStore
    keys: KeyStore
    tokens: TokenStore


def services(request: Request) -> Services:
    """The services of the app serving `request`."""
    found: Services = request.app.state.services
    return found
