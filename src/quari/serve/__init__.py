"""``quari serve``: an HTTP search service and a web page over one embedding set.

:func:`create_app` builds a FastAPI app over a :class:`~quari.retriever.Retriever`;
:class:`ServeSettings` holds its limits and micro-batching. Needs the ``serve`` extra
(``pip install 'quari[serve]'``).

Endpoints: ``POST /search`` (JSON or a multipart image upload), ``GET /items/{id}``,
``GET /items/{id}/image``, ``GET /info``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``,
``GET /docs`` (OpenAPI), and the web page at ``/``.

Example:
    >>> from quari.serve import ServeSettings, create_app  # doctest: +SKIP
    >>> app = create_app(retriever, ServeSettings(max_k=100))  # doctest: +SKIP
"""

from __future__ import annotations

from quari.errors import missing_extra
from quari.serve.settings import ServeSettings

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import python_multipart  # noqa: F401  (image uploads)
except ImportError as exc:
    raise missing_extra("quari serve", "serve", exc) from exc

from quari.serve.app import create_app

__all__ = ["ServeSettings", "create_app"]
