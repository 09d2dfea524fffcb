"""Bad input to the HTTP service: every case is a 4xx whose JSON names the problem; a 5xx
never shows a traceback; slow clients and slow searches are cut off; the service keeps
answering afterwards."""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import httpx
import pytest

from quari.errors import StoreError
from quari.serve import ServeSettings, create_app

from embed_helpers import bomb_png, photo, png_bytes
from serve_helpers import ROWS, TEXT_QUERY, make_served

pytest.importorskip("fastapi")
from starlette.testclient import TestClient

LIMITS = ServeSettings(max_k=50, max_candidates=500, max_upload_bytes=20_000, max_text_chars=200)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served.retriever(), LIMITS)) as c:
        yield c
        # Whatever came before, the process still answers.
        assert c.get("/healthz").status_code == 200
        ok = c.post("/search", json={"text": TEXT_QUERY, "mode": "plain"})
        assert ok.status_code == 200 and ok.json()["results"]


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"kind", "message"} <= set(body["error"])
    assert "Traceback" not in r.text
    return body["error"]["message"]


def post_raw(client, body: bytes | str, ctype: str = "application/json") -> httpx.Response:
    return client.post("/search", content=body, headers={"content-type": ctype})


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"text": "a cat", ', "Invalid JSON"),
        (b"\xff\xfe not json", "Invalid JSON"),
        (b"[1, 2, 3]", "body"),
        (b"", "Invalid JSON"),
        (b'{"k": 3}', "exactly one of text, image, item_id, embedding (got none)"),
        (b'{"text": "a", "item_id": 1}', "exactly one of"),
        (b'{"text": "a", "colour": "red"}', "colour"),
        (b'{"text": "a", "k": 0}', "k: Input should be greater than or equal to 1"),
        (b'{"text": "a", "k": -3}', "k: Input should be greater than or equal to 1"),
        (b'{"text": "a", "k": "ten"}', "k: Input should be a valid integer"),
        (b'{"text": "a", "k": 2.5}', "k: Input should be a valid integer"),
        (b'{"text": "a", "candidates": 0}', "candidates"),
        (b'{"text": "a", "mode": "fastest"}', "mode"),
        (b'{"text": 42}', "text"),
        (b'{"embedding": "0.1, 0.2"}', "embedding"),
        (b'{"item_id": "../../etc/passwd"}', "item_id"),
        (b'{"text": "a", "blend_weight": 1.5}', "blend_weight: Input should be less than or"),
        (b'{"text": "a", "blend_weight": -0.1}', "blend_weight: Input should be greater than"),
    ],
)
def test_malformed_requests_name_the_field(client, body, needle):
    assert needle in error_of(post_raw(client, body), 422)


def test_a_blend_weight_above_0_needs_a_model_with_the_blend(client):
    body = {"text": TEXT_QUERY, "blend_weight": 0.5}
    msg = error_of(client.post("/search", json=body), 422)
    assert "blend_weight: 0.5 needs a model trained with the static blend" in msg
    same = client.post("/search", json={**body, "blend_weight": 0}).json()["results"]
    assert same == client.post("/search", json={"text": TEXT_QUERY}).json()["results"]


def test_embedding_dimension_nan_inf_and_zero(client):
    msg = error_of(client.post("/search", json={"embedding": [0.1] * 5}), 422)
    assert "embedding" in msg and "dimension 16, got 5" in msg
    assert "dimension 16, got 0" in error_of(client.post("/search", json={"embedding": []}), 422)
    nan = "[" + ", ".join(["NaN"] + ["0.1"] * 15) + "]"
    msg = error_of(post_raw(client, f'{{"embedding": {nan}}}'), 422)
    assert "embedding" in msg and "NaN" in msg
    inf = "[" + ", ".join(["1e999"] + ["0.1"] * 15) + "]"
    assert "NaN or Inf" in error_of(post_raw(client, f'{{"embedding": {inf}}}'), 422)
    assert "all zeros" in error_of(client.post("/search", json={"embedding": [0.0] * 16}), 422)


def test_empty_and_over_long_text(client):
    assert "text: empty" in error_of(client.post("/search", json={"text": ""}), 422)
    assert "text: empty" in error_of(client.post("/search", json={"text": " \n\t "}), 422)
    msg = error_of(client.post("/search", json={"text": "x" * 201}), 413)
    assert "text" in msg and "max_text_chars" in msg


def test_k_and_candidates_above_the_maximum(client):
    msg = error_of(client.post("/search", json={"text": "a", "k": 51}), 413)
    assert "k: 51 is above the maximum of 50 (max_k)" in msg
    assert "max_k" in error_of(client.post("/search", json={"text": "a", "k": 10**30}), 413)
    msg = error_of(client.post("/search", json={"text": "a", "candidates": 501}), 413)
    assert "max_candidates" in msg


def test_non_image_and_bomb_uploads(client):
    for data, needle in [
        (b"%PDF-1.4 definitely not a picture", "not an image"),
        (b"", "empty file"),
        (png_bytes(photo(1))[:120], "truncated"),
        (bomb_png(), "decompression bomb"),
    ]:
        upload = client.post("/search", files={"image": ("q.png", data, "image/png")})
        assert needle in error_of(upload, 422)
        as_json = client.post("/search", json={"image": base64.b64encode(data).decode()})
        assert needle in error_of(as_json, 422)
    assert "not valid base64" in error_of(client.post("/search", json={"image": "@@@"}), 422)


def test_multipart_needs_an_image_file_and_known_fields(client):
    msg = error_of(client.post("/search", data={"k": "3"}, files={"other": ("x", b"1")}), 422)
    assert "file field named 'image'" in msg
    msg = error_of(
        client.post(
            "/search",
            files={"image": ("q.png", png_bytes(photo(1)), "image/png")},
            data={"text": "also text"},
        ),
        422,
    )
    assert "text" in msg
    two = [("image", ("a.png", b"1", "image/png")), ("image", ("b.png", b"2", "image/png"))]
    assert error_of(client.post("/search", files=two), 400)


def test_uploads_over_the_size_limit(client):
    limit = LIMITS.max_body_bytes
    # Declared too large: refused before a byte of the body is read.
    big = b"\x89PNG" + b"\0" * limit
    r = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert "request body too large" in error_of(r, 413)
    # Under the body limit but over the image limit.
    mid = b"\x89PNG" + b"\0" * (LIMITS.max_upload_bytes + 10)
    r = client.post("/search", files={"image": ("mid.png", mid, "image/png")})
    assert "max_upload_bytes" in error_of(r, 413)
    r = client.post("/search", json={"image": base64.b64encode(mid).decode()})
    assert "max_upload_bytes" in error_of(r, 413)


@pytest.mark.parametrize("ctype", ["application/json", "multipart/form-data; boundary=B"])
def test_a_streamed_body_is_cut_off_at_the_limit(served, ctype):
    """No Content-Length: the guard counts bytes as they arrive and stops reading at the limit
    (the sender is never drained)."""
    app = create_app(served.retriever(), LIMITS)
    sent = []

    async def body():
        if ctype.startswith("multipart"):
            yield b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(200):
            sent.append(8192)
            yield b"x" * 8192

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/search", content=body(), headers={"content-type": ctype})

    r = asyncio.run(go())
    assert "request body too large" in error_of(r, 413)
    assert LIMITS.max_body_bytes < sum(sent) <= LIMITS.max_body_bytes + 2 * 8192


@pytest.mark.parametrize(
    "path",
    [
        "/items/99999",
        "/items/-1",
        f"/items/{ROWS}",
        "/items/1e3",
        "/items/0x10",
        "/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/items/..%2F..%2Fmanifest.json",
        "/items/%2Fetc%2Fpasswd/image",
        "/items/%00/image",
        "/items/%EF%BC%91",  # a full-width digit one: not an ASCII row id
        "/items/" + "9" * 400,
        "/items/../manifest.json",
    ],
)
def test_unknown_and_crafted_item_ids(client, path):
    r = client.get(path)
    assert r.status_code == 404, (path, r.text)
    assert "Traceback" not in r.text and r.json()["error"]["kind"] == "not found"
    if path.endswith("/image"):
        assert r.headers["content-type"] == "application/json"


def test_unknown_item_as_a_query(client):
    assert "unknown item id 99999" in error_of(client.post("/search", json={"item_id": 99999}), 404)
    assert "unknown item id -4" in error_of(client.post("/search", json={"item_id": -4}), 404)


@pytest.mark.parametrize(
    "where, status, needle",
    [
        ("label ==", 422, "syntax error"),
        ("__import__('os').system('touch /tmp/x')", 422, "only field(), startswith()"),
        ("__import__('os') == 1", 422, "unknown function"),
        ("label.__class__ == 1", 422, "unsupported syntax"),
        ("[1] * 10**9 == label", 422, "unsupported syntax"),
        ("lambda: 1", 422, "unsupported"),
        ("not " * 450 + "label", 413, "levels deep"),
        ("(" * 300 + "label" + ")" * 300, 422, "filter"),
        ("no_such_column == 3", 422, "cannot be applied"),
        ("label > 3", 422, "cannot be applied"),
        ("label == 'x' " + "or label == 'y' " * 200, 413, "max_filter_chars"),
    ],
)
def test_malformed_and_hostile_filters(client, where, status, needle):
    r = client.post("/search", json={"text": TEXT_QUERY, "where": where, "mode": "plain"})
    msg = error_of(r, status)
    assert needle in msg
    assert msg.startswith(("filter", "where"))


def test_wrong_media_type_and_method(client):
    r = post_raw(client, b"text=a", "application/x-www-form-urlencoded")
    assert "send JSON or multipart" in error_of(r, 415)
    assert "no content type" in error_of(client.post("/search", content=b"{}"), 415)
    assert error_of(client.get("/search"), 405) == "GET is not allowed on '/search'"
    assert (
        error_of(client.get("/no/such/page"), 404) == "no endpoint at '/no/such/page' (see /docs)"
    )


def test_a_5xx_never_shows_a_traceback(served, monkeypatch, caplog):
    retriever = served.retriever()
    app = create_app(retriever, LIMITS)

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail /srv/private")

    with TestClient(app) as c:
        monkeypatch.setattr(retriever, "retrieve", explode)
        with caplog.at_level(logging.ERROR, logger="quari.serve"):
            r = c.post("/search", json={"text": TEXT_QUERY})
        body = r.json()["error"]
        assert r.status_code == 500 and body["kind"] == "unexpected error"
        assert "secret" not in r.text and "Traceback" not in r.text
        assert body["request_id"] == r.headers["x-request-id"]
        # The trace is in the server's log, under the request id.
        logged = [rec for rec in caplog.records if body["request_id"] in rec.getMessage()]
        assert logged and logged[0].exc_info is not None
        # A library error with a 5xx status keeps its kind and message, never a trace.
        monkeypatch.setattr(
            retriever, "retrieve", lambda *a, **k: (_ for _ in ()).throw(StoreError("shard 0 bad"))
        )
        r = c.post("/search", json={"text": TEXT_QUERY})
        assert r.status_code == 500 and r.json()["error"] == {
            "kind": "bad data",
            "message": "shard 0 bad",
        }
        monkeypatch.undo()
        assert c.post("/search", json={"text": TEXT_QUERY}).status_code == 200


def test_one_bad_query_does_not_fail_its_batch(served):
    settings = ServeSettings(batch_window_ms=200, max_batch=8)

    async def go(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(
                c.post("/search", json={"text": TEXT_QUERY, "mode": "plain"}),
                c.post("/search", json={"text": TEXT_QUERY, "where": "nope == 1"}),
                c.post("/search", json={"item_id": 3, "mode": "scan"}),
            )

    good, bad, other = asyncio.run(go(create_app(served.retriever(), settings)))
    assert good.status_code == other.status_code == 200
    assert "cannot be applied" in error_of(bad, 422)
    assert good.json()["batch_size"] == other.json()["batch_size"] == 3


def test_slow_client_and_slow_search_time_out(served, monkeypatch):
    settings = ServeSettings(request_timeout=0.3)
    retriever = served.retriever()
    app = create_app(retriever, settings)

    async def trickle():
        yield b'{"text": '
        await asyncio.sleep(5)
        yield b'"a cat"}'

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            t0 = time.perf_counter()
            slow_client = await c.post(
                "/search", content=trickle(), headers={"content-type": "application/json"}
            )
            waited = time.perf_counter() - t0
            real = retriever.retrieve

            def slow_retrieve(*args, **kwargs):
                time.sleep(0.6)
                return real(*args, **kwargs)

            monkeypatch.setattr(retriever, "retrieve", slow_retrieve)
            slow_search = await c.post("/search", json={"text": "a cat"})
            monkeypatch.undo()
            return slow_client, waited, slow_search

    slow_client, waited, slow_search = asyncio.run(go())
    assert "request body did not arrive within 0.3 s" in error_of(slow_client, 408)
    assert waited < 3
    assert "did not finish within 0.3 s" in error_of(slow_search, 504)
