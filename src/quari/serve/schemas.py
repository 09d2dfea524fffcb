"""Request and response bodies of the HTTP API (pydantic), and JSON-safe metadata."""

from __future__ import annotations

import base64
import binascii
import datetime
import decimal
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quari.errors import QuARIInputError

__all__ = [
    "ErrorBody",
    "Hit",
    "Info",
    "SearchOptions",
    "SearchRequest",
    "SearchResponse",
    "decode_base64",
    "jsonable",
    "validation_message",
]

QUERY_FIELDS = ("text", "image", "item_id", "embedding")


class SearchOptions(BaseModel):
    """How to search: the fields of ``POST /search`` besides the query (the form fields of a
    multipart upload)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, description="Results wanted (at most the service's max_k).")
    mode: Literal["plain", "rerank", "adaptive", "scan"] | None = Field(
        None, description="Search mode; default adaptive with a model, plain without."
    )
    candidates: int | None = Field(
        None, ge=1, description="Index candidates per query (K); default 1000 (or the maximum)."
    )
    where: str | None = Field(
        None, description="Metadata filter in quari's syntax, e.g. 'label == \"cat\"'."
    )
    blend_weight: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Weight a of the model's whitened-cosine blend for this query instead of "
        "the service's (QuARI modes; 0: QuARI's score alone). Needs a model trained with the "
        "blend.",
    )


class SearchRequest(SearchOptions):
    """``POST /search`` as JSON: exactly one of ``text``, ``image``, ``item_id``,
    ``embedding``, and the :class:`SearchOptions`."""

    text: str | None = Field(None, description="A text query (needs the set's encoder).")
    image: str | None = Field(
        None, description="A query image, base64 (a data: URL prefix is accepted)."
    )
    item_id: int | None = Field(None, description="A row of the set, used as the query.")
    embedding: list[float] | None = Field(
        None, description="A query embedding of the set's dimension."
    )

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [name for name in QUERY_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one of {', '.join(QUERY_FIELDS)} (got {found})")
        return self

    @property
    def kind(self) -> str:
        """Which query field is set."""
        return next(name for name in QUERY_FIELDS if getattr(self, name) is not None)


class Hit(BaseModel):
    """One result."""

    rank: int
    id: int = Field(description="Row id of the item in the set.")
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchResponse(BaseModel):
    """``POST /search``'s answer."""

    mode: str
    k: int
    query: str = Field(description="The query's kind: text, image, item_id or embedding.")
    results: list[Hit]
    notes: list[str] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(
        description="Milliseconds per stage: queue, encode, adapt, candidates, rescore, "
        "metadata (each the time of the batched call the query was part of), and total."
    )
    batch_size: int = Field(description="Queries in the micro-batch that answered this one.")


class Info(BaseModel):
    """``GET /info``: what the service offers (the web page reads it)."""

    set: str
    rows: int
    dim: int
    encoder: str
    has_model: bool
    runtime: str | None = Field(
        default=None, description="The model's CPU runtime (quari.runtime); null without one."
    )
    blend_weight: float | None = Field(
        default=None,
        description="The weight of the model's whitened-cosine blend that queries get unless "
        "they send their own blend_weight; null when the model has no blend.",
    )
    text_queries: bool
    image_queries: bool
    images: bool = Field(description="Items have image files the service can show.")
    modes: list[str]
    default_mode: str
    max_k: int
    max_upload_bytes: int
    batching: bool
    columns: list[str]


class ErrorBody(BaseModel):
    """Every error's body: ``{"error": {"kind", "message"}}`` (plus ``fields`` for invalid
    requests and ``request_id`` for internal errors)."""

    error: dict[str, Any]


def validation_message(exc: ValidationError) -> tuple[str, list[dict[str, str]]]:
    """A one-line message and the per-field list for a pydantic error."""
    fields = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        msg = str(err.get("msg", "invalid"))
        fields.append({"field": loc, "message": msg})
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return message or "invalid request", fields


def decode_base64(text: str, name: str = "image") -> bytes:
    """Bytes of a base64 string (or a ``data:...;base64,`` URL).

    Raises:
        QuARIInputError: not valid base64 (naming ``name``).
    """
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise QuARIInputError(f"{name}: not valid base64") from None


def jsonable(value: Any) -> Any:
    """Metadata values as JSON: non-finite floats → None, bytes → a length note, dates → ISO
    text, decimals → float, containers recursively; anything else → its string."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return jsonable(float(value))
    return str(value)
