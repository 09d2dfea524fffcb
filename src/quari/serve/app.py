"""The FastAPI app factory: routes, error handlers and middleware over one
:class:`~quari.serve.service.Service`. No module-level state: every app holds its own."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from quari import __version__
from quari.errors import QuARIError, QuARIInputError, error_kind
from quari.retriever import Retriever
from quari.serve.batching import Overloaded
from quari.serve.images import parse_item_id
from quari.serve.metrics import CONTENT_TYPE_LATEST
from quari.serve.middleware import Guard, error_response
from quari.serve.schemas import (
    ErrorBody,
    Info,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    validation_message,
)
from quari.serve.service import Service
from quari.serve.settings import ServeSettings

__all__ = ["create_app"]

log = logging.getLogger("quari.serve")

#: The page loads only its own scripts, styles and images.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [
        (404, "Unknown item"),
        (413, "Above a limit (k, candidates, upload size, text length)"),
        (415, "Neither JSON nor multipart"),
        (422, "Invalid request; the message names the field"),
        (503, "Overloaded or shutting down"),
    ]
}
SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "k": {"type": "integer"},
                        "mode": {"type": "string"},
                        "candidates": {"type": "integer"},
                        "where": {"type": "string"},
                    },
                }
            },
        },
    }
}


def create_app(retriever: Retriever, settings: ServeSettings | None = None) -> FastAPI:
    """Builds the HTTP service over one retriever.

    Args:
        retriever: The set, model, index and encoder to serve (shared read-only).
        settings: Limits, batching, CORS (defaults: :class:`ServeSettings`).

    Returns:
        The ASGI app (run it with uvicorn; ``quari serve`` does).

    Example:
        >>> app = create_app(Retriever(eset, model, index, encoder=enc))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    settings = settings or ServeSettings()
    service = Service(retriever, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="quari",
        version=__version__,
        description="Query-adaptive retrieval (QuARI) over one embedding set.",
        lifespan=lifespan,
    )
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    app.mount("/static", StaticFiles(packages=[("quari.serve", "static")]), name="static")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["content-type"],
        )
    app.add_middleware(  # added last: the outermost layer
        Guard,
        max_body_bytes=settings.max_body_bytes,
        timeout_s=settings.request_timeout,
        metrics=service.metrics,
    )
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def quari_error(request: Request, exc: Exception) -> JSONResponse:
        kind = error_kind(exc)
        if kind.http_status >= 500:
            rid = request.scope.get("state", {}).get("request_id")
            log.error("request %s: %s", rid, exc, exc_info=exc)
        return error_response(kind.http_status, kind.name, str(exc))

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else None
        if errors is not None:
            fields = [
                {"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg")}
                for e in errors
            ]
            message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        else:
            assert isinstance(exc, ValidationError)
            message, fields = validation_message(exc)
        return error_response(422, "bad input", message, fields=fields)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kinds = {404: "not found", 405: "method not allowed", 415: "unsupported media type"}
        message = str(exc.detail)
        path = request.url.path[:200]
        if exc.status_code == 404 and message == "Not Found":  # the router's: no such route
            message = f"no endpoint at {path!r} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {path!r}"
        reply = error_response(exc.status_code, kinds.get(exc.status_code, "bad request"), message)
        reply.headers.update(exc.headers or {})
        return reply

    async def overloaded(request: Request, exc: Exception) -> JSONResponse:
        reply = error_response(503, "overloaded", str(exc))
        reply.headers["Retry-After"] = "1"
        return reply

    app.add_exception_handler(QuARIError, quari_error)
    app.add_exception_handler(FileNotFoundError, quari_error)
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Overloaded, overloaded)


async def _parse_search(request: Request, service: Service) -> Any:
    """The request's :class:`~quari.serve.batching.Query`, from JSON or a multipart upload."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        body = await request.body()
        return await service.query(SearchRequest.model_validate_json(body))
    if ctype == "multipart/form-data":
        s = service.settings
        async with request.form(
            max_files=1, max_fields=8, max_part_size=4 * s.max_filter_chars + 1024
        ) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise QuARIInputError(
                    "image: a multipart search carries the query image in a file field "
                    "named 'image'"
                )
            fields = {k: v for k, v in form.multi_items() if k != "image"}
            options = SearchOptions.model_validate(fields)
            # The body limit already bounds the upload; read one byte more than allowed to
            # tell "at the limit" from "over it".
            data = await upload.read(s.max_upload_bytes + 1)
        return await service.image_query(options, data)
    raise HTTPException(
        415, f"send JSON or multipart/form-data (got {ctype or 'no content type'!r})"
    )


def _add_routes(app: FastAPI, service: Service) -> None:
    static = resources.files("quari.serve") / "static"

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text("utf-8"), headers=PAGE_HEADERS)

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses=ERRORS,
        openapi_extra=SEARCH_BODY,
        summary="Search the set with a text, an image, an item or an embedding",
    )
    async def search(request: Request) -> SearchResponse:
        started = time.perf_counter()
        query = await _parse_search(request, service)
        return await service.search(query, started)

    @app.get("/items/{item_id}", responses=ERRORS, summary="An item's metadata")
    def item(item_id: str) -> dict[str, Any]:
        return service.item(item_id)

    @app.get(
        "/items/{item_id}/image",
        responses=ERRORS,
        response_class=Response,
        summary="An item's image: a JPEG thumbnail, or the original file with size=full",
    )
    def item_image(item_id: str, size: str = "thumb") -> Response:
        row = parse_item_id(item_id, service.eset.rows)
        if size == "full":
            path, media_type = service.images.original(row)
            return FileResponse(path, media_type=media_type, headers=PAGE_HEADERS)
        if size != "thumb":
            raise QuARIInputError(f"size: expected 'thumb' or 'full', got {size[:40]!r}")
        data = service.images.thumbnail(row)
        headers = {"Cache-Control": "public, max-age=3600", **PAGE_HEADERS}
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/info", response_model=Info, summary="What this service offers")
    def info() -> Info:
        return service.info()

    @app.get("/healthz", summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: set and model loaded, batcher running")
    def readyz() -> Response:
        if service.ready and not service.batcher.closing:
            return JSONResponse({"status": "ready"})
        return error_response(503, "not ready", "the service is starting or stopping")

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
