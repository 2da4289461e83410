"""The API's own documentation: the OpenAPI document at /openapi.json, Swagger UI at /docs
and ReDoc at /redoc.

The pages' scripts, styles and icon come from this server, out of the fastapi-offline
package (which ships Swagger UI's and ReDoc's builds), never from a CDN: the pages work
on a host with no internet access, and tell no third party who reads them.

`SEALSTREAM_API_DOCS` says who may read them: `public` (the default: they describe the
API, which is public, and no tenant's data), `token` (the OpenAPI document to any valid
token; no pages, as a browser cannot send one), or `off`.
"""

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from api.auth import authenticated
from sealstream.settings import ApiDocs

OPENAPI_PATH = "/openapi.json"
ASSETS_PATH = "/docs/assets"
ASSETS_PACKAGE = ("fastapi_offline", "static")
# Swagger UI sends the document to an online validator unless told not to.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


def install(app: FastAPI, access: ApiDocs) -> None:
    """Serve the documentation that `access` allows."""
    if access == "off":
        return
    guard = [Depends(authenticated)] if access == "token" else []

    @app.get(OPENAPI_PATH, include_in_schema=False, dependencies=guard)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    if access == "public":
        _install_pages(app)


def _install_pages(app: FastAPI) -> None:
    app.mount(ASSETS_PATH, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=root + OPENAPI_PATH,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(
            openapi_url=root + OPENAPI_PATH,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )


def _root(request: Request) -> str:
    """The path the app is mounted under, behind a proxy that says so."""
    return str(request.scope.get("root_path", ""))
