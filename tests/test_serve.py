"""The HTTP service's endpoints (httpx against the app): every query kind and mode against
the library's own answer, items and their images, health, readiness, metrics, OpenAPI, CORS."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from quari.checkpoint import load_model
from quari.embed.images import load_image
from quari.retriever import Retriever
from quari.serve import ServeSettings, create_app

from helpers import brute_force, perturbed_low_rank
from serve_helpers import ROWS, TEXT_QUERY, TEXT_ROW, make_served

pytest.importorskip("fastapi")
from starlette.testclient import TestClient


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served.retriever())) as c:
        yield c


def ids(body):
    return [hit["id"] for hit in body["results"]]


def test_text_query_finds_the_planted_row_in_plain_mode(client):
    r = client.post("/search", json={"text": TEXT_QUERY, "k": 5, "mode": "plain"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "plain" and body["query"] == "text" and body["k"] == 5
    assert ids(body)[0] == TEXT_ROW
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)  # fp16 storage
    assert body["results"][0]["metadata"]["label"] == TEXT_QUERY
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert set(body["timings_ms"]) >= {"queue", "encode", "adapt", "candidates", "rescore"}
    assert all(v >= 0 for v in body["timings_ms"].values())
    assert body["batch_size"] >= 1


@pytest.mark.parametrize("mode", ["plain", "rerank", "adaptive", "scan"])
def test_every_mode_answers_what_the_library_answers(served, client, mode):
    r = client.post("/search", json={"text": "snow on a roof", "k": 6, "mode": mode})
    assert r.status_code == 200, r.text
    want = served.retriever().search(texts=["snow on a roof"], k=6, mode=mode)
    assert ids(r.json()) == want.ids[0].tolist()
    scores = [h["score"] for h in r.json()["results"]]
    np.testing.assert_allclose(scores, want.scores[0], rtol=0, atol=1e-5)


def test_default_mode_is_adaptive_with_a_model_and_plain_without(served):
    with TestClient(create_app(served.retriever(model=False))) as c:
        assert c.post("/search", json={"item_id": 3}).json()["mode"] == "plain"
        r = c.post("/search", json={"item_id": 3, "mode": "adaptive"})
        assert r.status_code == 422 and "needs a QuARI model" in r.json()["error"]["message"]
        assert c.get("/info").json()["modes"] == ["plain"]
    with TestClient(create_app(served.retriever())) as c:
        assert c.post("/search", json={"item_id": 3}).json()["mode"] == "adaptive"


def test_image_query_as_base64_and_as_upload(served, client):
    data = served.image_path(11).read_bytes()
    as_json = client.post(
        "/search", json={"image": base64.b64encode(data).decode(), "k": 4, "mode": "plain"}
    )
    as_data_url = client.post(
        "/search",
        json={"image": "data:image/png;base64," + base64.b64encode(data).decode(), "k": 4},
    )
    upload = client.post(
        "/search",
        files={"image": ("q.png", data, "image/png")},
        data={"k": "4", "mode": "plain", "where": "group >= 0"},
    )
    assert as_json.status_code == upload.status_code == as_data_url.status_code == 200
    assert ids(as_json.json())[0] == 11
    assert ids(upload.json()) == ids(as_json.json())
    assert upload.json()["query"] == "image"
    image = load_image(data).image
    want = served.retriever().search(images=[image], k=4, mode="adaptive")
    assert ids(as_data_url.json()) == want.ids[0].tolist()


def test_item_and_embedding_queries(served, client):
    by_item = client.post("/search", json={"item_id": 20, "k": 3, "mode": "plain"}).json()
    assert ids(by_item)[0] == 20 and by_item["query"] == "item_id"
    vector = served.eset.gather([20]).astype(np.float32)[0]
    by_vector = client.post(
        "/search", json={"embedding": vector.tolist(), "k": 3, "mode": "scan"}
    ).json()
    want = served.retriever().search(vector[None], k=3, mode="scan")
    assert ids(by_vector) == want.ids[0].tolist()


def test_filter_and_notes(client):
    r = client.post(
        "/search", json={"text": TEXT_QUERY, "k": 20, "mode": "plain", "where": 'label == "cat"'}
    )
    body = r.json()
    assert r.status_code == 200
    assert len(body["results"]) == 16  # 48 rows, every third a cat, none the planted row
    assert all(h["metadata"]["label"] == "cat" for h in body["results"])
    assert TEXT_ROW not in ids(body)
    assert any("fewer than k" in note for note in body["notes"])


def test_items_and_info(client):
    r = client.get(f"/items/{TEXT_ROW}")
    assert r.status_code == 200
    assert r.json() == {
        "id": TEXT_ROW,
        "metadata": {"path": f"images/{TEXT_ROW}.png", "label": TEXT_QUERY, "group": 3},
        "image": f"/items/{TEXT_ROW}/image",
    }
    info = client.get("/info").json()
    assert info["rows"] == ROWS and info["dim"] == 16 and info["encoder"] == "toy"
    assert info["has_model"] and info["text_queries"] and info["images"]
    assert info["runtime"] == "eager"
    assert info["modes"] == ["plain", "rerank", "adaptive", "scan"]
    assert info["columns"] == ["path", "label", "group"]
    assert info["blend_weight"] is None  # the model has no static blend


def test_a_blended_model_answers_each_request_at_its_blend_weight(served):
    """Over HTTP: /info gives the model's weight; a request's ``blend_weight`` (JSON or a
    multipart form field) scores as the model set to that weight; without one, the model's."""
    from helpers import blended_model

    model = blended_model(served.eset.dim, seed=2)
    retriever = Retriever(served.eset, model, served.index, encoder=served.encoder)
    with TestClient(create_app(retriever, ServeSettings())) as c:
        assert c.get("/info").json()["blend_weight"] == 0.5
        for weight in (None, 0.0, 0.8):
            body = {"text": TEXT_QUERY, "mode": "scan", "k": 6}
            if weight is not None:
                body["blend_weight"] = weight
            got = c.post("/search", json=body)
            model.set_blend_weight(weight)
            want = retriever.search(texts=[TEXT_QUERY], k=6, mode="scan")
            model.set_blend_weight(None)
            assert ids(got.json()) == want.ids[0].tolist()
            scores = [h["score"] for h in got.json()["results"]]
            np.testing.assert_allclose(scores, want.scores[0], rtol=0, atol=1e-5)
        image = served.image_path(4).read_bytes()
        form = {"mode": "scan", "k": "5", "blend_weight": "0.8"}
        got = c.post("/search", data=form, files={"image": ("q.png", image, "image/png")})
        model.set_blend_weight(0.8)
        want = retriever.search(images=[load_image(image).image], k=5, mode="scan")
        model.set_blend_weight(None)
        assert got.status_code == 200 and ids(got.json()) == want.ids[0].tolist()


def test_item_image_thumbnail_and_original(served, client):
    thumb = client.get("/items/5/image")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(thumb.content))
    assert picture.format == "JPEG" and picture.size == (48, 40)  # never enlarged
    full = client.get("/items/5/image?size=full")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert full.content == served.image_path(5).read_bytes()
    bad = client.get("/items/5/image?size=huge")
    assert bad.status_code == 422 and "size" in bad.json()["error"]["message"]


def test_thumbnails_shrink_to_the_setting(served):
    settings = ServeSettings(thumbnail_px=16)
    with TestClient(create_app(served.retriever(), settings)) as c:
        picture = Image.open(io.BytesIO(c.get("/items/2/image").content))
    assert max(picture.size) == 16


def test_health_readiness_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    spec = client.get("/openapi.json").json()
    assert {"/search", "/items/{item_id}", "/items/{item_id}/image", "/healthz"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    fields = body["application/json"]["schema"]["properties"]
    assert {"text", "image", "item_id", "embedding", "k", "mode", "where"} <= set(fields)
    assert client.get("/docs").status_code == 200


def test_readiness_follows_the_lifespan(served):
    app = create_app(served.retriever())
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
    with TestClient(app, raise_server_exceptions=False) as c:  # a second start: ready again
        assert c.get("/readyz").status_code == 200
    # After shutdown the service answers, but is not ready.
    c = TestClient(app)
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["kind"] == "not ready"


def test_metrics_count_requests_and_stages(served):
    with TestClient(create_app(served.retriever())) as c:
        c.post("/search", json={"text": TEXT_QUERY, "mode": "plain"})
        c.post("/search", json={"text": TEXT_QUERY, "k": 0})
        c.get("/items/99999")
        text = c.get("/metrics").text
    assert 'quari_requests_total{method="POST",route="/search",status="200"} 1.0' in text
    assert 'quari_requests_total{method="POST",route="/search",status="422"} 1.0' in text
    assert 'quari_requests_total{method="GET",route="/items/{item_id}",status="404"} 1.0' in text
    for stage in ("queue", "encode", "adapt", "candidates", "rescore"):
        assert f'quari_stage_seconds_count{{stage="{stage}"}} 1.0' in text
    assert "quari_queue_depth 0.0" in text
    assert "quari_batch_size_count 1.0" in text


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="drop-zone"' in page.text and 'src="/static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]


def test_cors_is_off_unless_configured(served, client):
    headers = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    off = client.options("/search", headers=headers)
    assert "access-control-allow-origin" not in off.headers
    settings = ServeSettings(cors_origins=("http://elsewhere.example",))
    with TestClient(create_app(served.retriever(), settings)) as c:
        on = c.options("/search", headers=headers)
        assert on.headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_without_an_encoder_it_answers_embeddings_and_items(served):
    with TestClient(create_app(served.retriever(encoder=False))) as c:
        assert c.post("/search", json={"item_id": 1, "mode": "plain"}).status_code == 200
        r = c.post("/search", json={"text": "a cat"})
        assert r.status_code == 422 and "no encoder" in r.json()["error"]["message"]
        info = c.get("/info").json()
        assert not info["text_queries"] and not info["image_queries"]


def test_every_response_has_a_request_id(client):
    a, b = client.get("/healthz"), client.get("/healthz")
    assert len(a.headers["x-request-id"]) == 16
    assert a.headers["x-request-id"] != b.headers["x-request-id"]


@pytest.mark.parametrize("mode", ["scan", "rerank", "adaptive"])
def test_a_low_rank_linear_adapter_folder_is_served_like_a_model(served, tmp_path, mode):
    # What `quari serve --model demo-out/static` does: load the folder, serve every mode.
    folder = perturbed_low_rank(served.encoder.dim, rank=3, encoder="toy").save(tmp_path / "lin")
    adapter = load_model(folder)
    retriever = Retriever(served.eset, adapter, served.index, encoder=served.encoder)
    with TestClient(create_app(retriever)) as c:
        assert c.get("/info").json()["modes"] == ["plain", "rerank", "adaptive", "scan"]
        r = c.post("/search", json={"text": TEXT_QUERY, "k": 5, "mode": mode})
    assert r.status_code == 200, r.text
    want = retriever.search(texts=[TEXT_QUERY], k=5, mode=mode)
    assert ids(r.json()) == want.ids[0].tolist()
    if mode == "scan":  # exhaustive: the top 5 of cos(W q, W d) over every stored row
        q = served.encoder.encode_texts([TEXT_QUERY])
        oracle = brute_force(adapter, q, served.eset.gather(np.arange(ROWS)).astype(np.float32))[0]
        scores = [h["score"] for h in r.json()["results"]]
        np.testing.assert_allclose(scores, np.sort(oracle)[::-1][:5], rtol=0, atol=1e-5)
        assert ids(r.json()) == np.argsort(-oracle)[:5].tolist()
