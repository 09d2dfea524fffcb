"""The service's outermost guard (pure ASGI): request ids, the request timeout, the body-size
limit enforced while the body streams in, request metrics, and the last-resort 500 that never
shows a traceback.

A slow client cannot hold the service: the whole exchange — reading the body included — runs
under ``request_timeout`` (408 while the body is still arriving, 504 once it is in); uvicorn's
``timeout_keep_alive`` and header-size limit cover idle and oversized connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quari.errors import LimitError
from quari.serve.metrics import Metrics

__all__ = ["BodyTooLarge", "Guard", "error_response"]

log = logging.getLogger("quari.serve")


class BodyTooLarge(LimitError):
    """A request body longer than the service accepts (raised while it streams in)."""


def error_response(
    status: int, kind: str, message: str, *, request_id: str | None = None, **extra: Any
) -> JSONResponse:
    """The one error body: ``{"error": {"kind", "message", ...}}``."""
    error: dict[str, Any] = {"kind": kind, "message": message, **extra}
    if request_id:
        error["request_id"] = request_id
    return JSONResponse({"error": error}, status_code=status)


@dataclass
class _Exchange:
    request_id: str
    status: int = 500
    started: bool = False
    body_done: bool = False
    received: int = 0


class Guard:
    """Wraps the app: see the module docstring.

    Args:
        app: The ASGI app.
        max_body_bytes: Longest request body; longer ones get 413 (at once when the declared
            ``Content-Length`` says so, else as soon as the stream passes the limit).
        timeout_s: Seconds per request.
        metrics: Where answered requests are counted.
    """

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, timeout_s: float, metrics: Metrics
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = _Exchange(uuid.uuid4().hex[:16])
        scope.setdefault("state", {})["request_id"] = ex.request_id
        t0 = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        has_body = b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"

        async def guarded_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                ex.received += len(message.get("body", b""))
                if ex.received > self.max_body_bytes:
                    raise BodyTooLarge(self._too_large(f"more than {ex.received:,} bytes"))
                if not message.get("more_body", False):
                    ex.body_done = True
            return message

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.started, ex.status = True, int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", ex.request_id.encode()),
                ]
            await send(message)

        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        try:
            if declared > self.max_body_bytes:
                reply = error_response(
                    413, "over a limit", self._too_large(f"{declared:,} bytes declared")
                )
                await reply(scope, receive, tracked_send)
                return
            await asyncio.wait_for(
                self.app(scope, guarded_receive, tracked_send), timeout=self.timeout_s
            )
        except asyncio.TimeoutError:
            if not ex.started:
                if has_body and not ex.body_done:
                    status, kind, what = 408, "request timeout", "the request body did not arrive"
                else:
                    status, kind, what = 504, "timeout", "the search did not finish"
                message = f"{what} within {self.timeout_s:g} s (request_timeout)"
                await error_response(status, kind, message)(scope, receive, tracked_send)
        except BodyTooLarge as exc:  # raised where no handler of the app could answer it
            if not ex.started:
                await error_response(413, "over a limit", str(exc))(scope, receive, tracked_send)
        except Exception as exc:
            log.error("request %s failed", ex.request_id, exc_info=exc)
            if not ex.started:
                reply = error_response(
                    500,
                    "unexpected error",
                    "internal error; the server log has the details",
                    request_id=ex.request_id,
                )
                await reply(scope, receive, tracked_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request(
                route, scope.get("method", "?"), ex.status, time.perf_counter() - t0
            )

    def _too_large(self, what: str) -> str:
        return f"request body too large: {what}, the limit is {self.max_body_bytes:,} bytes"
