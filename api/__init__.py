"""api: the HTTP interface — FastAPI app factory, routes, auth, errors, streaming bodies."""

from api.app import create_app

__all__ = ["create_app"]
