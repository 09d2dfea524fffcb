"""Micro-batching: batched answers equal unbatched ``Retriever.search``; one encoder call per
kind and one model pass per batch; the asyncio batcher's window, cap, queue limit and drain."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest

from quari.embed.images import load_image
from quari.serve import ServeSettings, create_app
from quari.serve.batching import Answer, MicroBatcher, Overloaded, Query, run_batch

from serve_helpers import TEXT_QUERY, make_served

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory.mktemp("serve"))


def mixed_queries(served) -> list[Query]:
    image = load_image(served.image_path(9)).image
    vector = np.random.default_rng(3).standard_normal(16).astype(np.float32)
    return [
        Query("text", TEXT_QUERY, "plain", 5, 20),
        Query("text", TEXT_QUERY, "adaptive", 5, 20),  # the same text, another mode
        Query("text", "a small boat", "rerank", 3, 10),
        Query("image", image, "scan", 4, 20),
        Query("image", image, "adaptive", 4, 20, 'label != "cat"'),
        Query("embedding", vector, "adaptive", 5, 20),
        Query("embedding", vector, "plain", 7, 20, "group == 1"),
        Query("item", 12, "rerank", 5, 20),
        Query("item", 12, "adaptive", 5, 20),  # same group as the next
        Query("item", 30, "adaptive", 5, 20),
        Query("text", "a red car", "scan", 6, 20, "group >= 2"),
    ]


def alone(served, q: Query):
    """The unbatched answer: ``Retriever.search`` on this one query."""
    r = served.retriever()
    kwargs = dict(k=q.k, mode=q.mode, candidates=q.candidates, where=q.where)
    if q.kind == "text":
        return r.search(texts=[q.value], **kwargs)
    if q.kind == "image":
        return r.search(images=[q.value], **kwargs)
    if q.kind == "item":
        return r.search(served.eset.gather([q.value]).astype(np.float32), **kwargs)
    return r.search(q.value[None], **kwargs)


def test_batched_answers_equal_unbatched_search(served):
    queries = mixed_queries(served)
    answers = run_batch(served.retriever(), queries)
    for q, answer in zip(queries, answers, strict=True):
        assert isinstance(answer, Answer), answer
        want = alone(served, q)
        np.testing.assert_array_equal(answer.result.ids, want.ids)
        np.testing.assert_allclose(answer.result.scores, want.scores, rtol=0, atol=1e-5)
        got_meta, want_meta = answer.result.metadata[0], want.metadata[0]
        assert got_meta.drop_columns(["score"]).equals(want_meta.drop_columns(["score"]))
        assert answer.result.notes == want.notes
        assert set(answer.timings) >= {"encode", "adapt", "candidates", "rescore", "metadata"}


def test_a_per_query_blend_weight_equals_the_model_searched_at_that_weight(served):
    """Queries of one batch that ask for other weights of a blended model's static blend (0,
    0.9, the model's own) each get ``Retriever.search`` of the model set to that weight; the
    model pass is shared and the model's own weight is left as it was."""
    from quari.retriever import Retriever

    from helpers import blended_model

    model = blended_model(served.eset.dim, seed=1)
    retriever = Retriever(served.eset, model, served.index, encoder=served.encoder)
    vector = np.random.default_rng(5).standard_normal(served.eset.dim).astype(np.float32)
    queries = [
        Query("text", TEXT_QUERY, mode, 5, 20, None, weight)
        for mode in ("scan", "rerank", "adaptive")
        for weight in (None, 0.0, 0.9, 0.5)
    ] + [Query("embedding", vector, "scan", 6, 20, "group >= 1", 0.9)]
    answers = run_batch(retriever, queries)
    assert model.blend_weight == 0.5
    scores = {}
    for q, answer in zip(queries, answers, strict=True):
        assert isinstance(answer, Answer), answer
        model.set_blend_weight(q.blend_weight)
        value = [q.value] if q.kind == "text" else None
        want = retriever.search(
            None if value else q.value[None], q.k, texts=value, mode=q.mode,
            candidates=q.candidates, where=q.where,
        )  # fmt: skip
        model.set_blend_weight(None)
        np.testing.assert_array_equal(answer.result.ids, want.ids)
        np.testing.assert_allclose(answer.result.scores, want.scores, rtol=0, atol=1e-5)
        if q.kind == "text":
            scores[q.mode, q.blend_weight] = answer.result.scores
    # the weight counts, and None is the model's own 0.5
    assert not np.allclose(scores["scan", 0.0], scores["scan", 0.9])
    np.testing.assert_allclose(scores["scan", None], scores["scan", 0.5], rtol=0, atol=1e-6)
    # a service started at weight 0 (`quari serve --blend-weight 0`) still serves a request's 0.9
    model.set_blend_weight(0)
    try:
        (answer,) = run_batch(retriever, [Query("text", TEXT_QUERY, "scan", 5, 20, None, 0.9)])
    finally:
        model.set_blend_weight(None)
    np.testing.assert_allclose(answer.result.scores, scores["scan", 0.9], rtol=0, atol=1e-6)


def test_one_encoder_call_per_kind_and_one_model_pass(served, monkeypatch):
    retriever = served.retriever()
    calls = {"texts": [], "images": [], "adapt": []}
    encode, adapt = retriever.encode, retriever.adapt

    def counting_encode(*, texts=None, images=None):
        calls["texts" if texts is not None else "images"].append(len(texts or images))
        return encode(texts=texts, images=images)

    def counting_adapt(queries, mode):
        calls["adapt"].append((len(queries), mode == "plain"))
        return adapt(queries, mode)

    monkeypatch.setattr(retriever, "encode", counting_encode)
    monkeypatch.setattr(retriever, "adapt", counting_adapt)
    run_batch(retriever, mixed_queries(served))
    assert calls["texts"] == [3]  # four text queries, three distinct texts
    assert calls["images"] == [2]
    assert sorted(calls["adapt"]) == [(2, True), (9, False)]


def test_failures_stay_with_their_queries(served, monkeypatch):
    retriever = served.retriever()

    def broken(texts):
        raise RuntimeError("text tower down")

    monkeypatch.setattr(served.encoder, "encode_texts", broken)
    queries = [
        Query("text", "a cat", "plain", 3, 10),
        Query("item", 4, "plain", 3, 10, "no_such_column == 1"),
        Query("item", 4, "adaptive", 3, 10),
    ]
    text, bad_filter, good = run_batch(retriever, queries)
    assert isinstance(text, RuntimeError) and "text tower down" in str(text)
    assert isinstance(bad_filter, ValueError) and "cannot be applied" in str(bad_filter)
    assert isinstance(good, Answer) and good.result.ids[0, 0] >= 0


def run_batcher(batcher, items, *, delay=0.0):
    async def go():
        async def one(i, item):
            await asyncio.sleep(delay * i)
            return await batcher.submit(item)

        out = await asyncio.gather(*(one(i, x) for i, x in enumerate(items)))
        await batcher.close()
        return out

    return asyncio.run(go())


def test_the_batcher_groups_concurrent_items_up_to_the_cap():
    sizes, threads = [], set()

    def double(items):
        threads.add(threading.current_thread().name)
        return [2 * x for x in items]

    batcher = MicroBatcher(double, window_s=0.05, max_batch=4, on_batch=sizes.append)
    out = run_batcher(batcher, list(range(10)))
    assert [b.value for b in out] == [2 * x for x in range(10)]
    assert sizes == [4, 4, 2]
    assert [b.batch_size for b in out] == [4] * 8 + [2] * 2
    assert all(b.queued >= 0 for b in out)
    assert len(threads) == 1 and threads.pop().startswith("quari-inference")


def test_without_batching_every_item_runs_alone():
    sizes = []
    batcher = MicroBatcher(lambda xs: xs, window_s=0.0, max_batch=1, on_batch=sizes.append)
    assert [b.value for b in run_batcher(batcher, list(range(6)))] == list(range(6))
    assert sizes == [1] * 6


def test_an_exception_reaches_only_its_item_and_a_crash_reaches_all():
    batcher = MicroBatcher(
        lambda xs: [ValueError(f"bad {x}") if x < 0 else x for x in xs], window_s=0.05
    )

    async def go():
        results = await asyncio.gather(
            batcher.submit(1), batcher.submit(-1), batcher.submit(2), return_exceptions=True
        )
        await batcher.close()
        return results

    one, bad, two = asyncio.run(go())
    assert one.value == 1 and two.value == 2 and str(bad) == "bad -1"

    def crash(xs):
        raise MemoryError("out of memory")

    crashing = MicroBatcher(crash, window_s=0.05)

    async def go_crash():
        results = await asyncio.gather(
            crashing.submit(1), crashing.submit(2), return_exceptions=True
        )
        await crashing.close()
        return results

    assert [type(r) for r in asyncio.run(go_crash())] == [MemoryError, MemoryError]


def test_a_broken_batch_function_fails_its_items_and_the_worker_lives_on():
    calls = []

    def wrong_length(items):
        calls.append(len(items))
        return [] if len(calls) == 1 else items

    batcher = MicroBatcher(wrong_length, window_s=0.0, max_batch=1)

    async def go():
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            await batcher.submit("a")
        after = await batcher.submit("b")
        await batcher.close()
        return after.value

    assert asyncio.run(go()) == "b"


def test_close_drains_the_queue_then_refuses():
    seen = []

    def slow(items):
        seen.extend(items)
        return items

    batcher = MicroBatcher(slow, window_s=0.0, max_batch=2)

    async def go():
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
        await asyncio.sleep(0)  # all five are queued
        await batcher.close()
        with pytest.raises(Overloaded, match="shutting down"):
            await batcher.submit(99)
        return [t.result().value for t in tasks]

    assert asyncio.run(go()) == list(range(5))
    assert seen == list(range(5))


def test_a_full_queue_refuses_and_cancelled_items_are_skipped():
    started, release, seen = threading.Event(), threading.Event(), []

    def blocking(items):
        seen.extend(items)
        started.set()
        release.wait(5)
        return items

    batcher = MicroBatcher(blocking, window_s=0.0, max_batch=1, max_queue=2)

    async def go():
        first = asyncio.create_task(batcher.submit("first"))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        queued = [asyncio.create_task(batcher.submit(x)) for x in ("a", "b")]
        await asyncio.sleep(0.01)
        assert batcher.depth == 2
        with pytest.raises(Overloaded, match="max_queue 2"):
            await batcher.submit("c")
        queued[0].cancel()  # a client that went away
        release.set()
        await asyncio.gather(first, queued[1])
        await batcher.close()

    asyncio.run(go())
    assert seen == ["first", "b"]


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_batches_and_get_their_own_answers(served, batching):
    settings = ServeSettings(batching=batching, batch_window_ms=150, max_batch=16)
    app = create_app(served.retriever(), settings)
    texts = [TEXT_QUERY, "a small boat", "two dogs", "a red car"]
    bodies = [
        {"text": texts[i % 4], "k": 4, "mode": ("plain", "adaptive", "rerank")[i % 3]}
        for i in range(12)
    ]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/search", json=b) for b in bodies))

    replies = asyncio.run(go())
    sizes = [r.json()["batch_size"] for r in replies]
    assert max(sizes) > 1 if batching else set(sizes) == {1}
    for body, reply in zip(bodies, replies, strict=True):
        want = served.retriever().search(texts=[body["text"]], k=4, mode=body["mode"])
        assert [h["id"] for h in reply.json()["results"]] == want.ids[0].tolist()
