"""ILIAS and mini-ILIAS on fixtures in the release's formats: id lists (1-row, 1-column, gz),
HDF5 features, the gallery import and its cache, mAP@1k against the official estimator."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from quari import QuARIModel
from quari.errors import DataError, NotFoundError, QuARIInputError
from quari.eval.protocols import IliasEvaluator
from quari.eval.protocols.ilias import (
    import_gallery,
    instance_of,
    key_of,
    read_features,
    read_ids,
    read_taxonomy,
)
from quari.eval.protocols.io import SOURCE_FILE

from eval_fixtures import ilias_oracle, official_ap, write_ilias
from helpers import dense_scores, tiny_config


@pytest.fixture(scope="module")
def ilias(tmp_path_factory):
    return write_ilias(tmp_path_factory.mktemp("ilias") / "ilias_data")


def test_read_ids_handles_one_row_one_column_and_gzip(tmp_path):
    (tmp_path / "one_row.txt").write_text("inst/query/Q000_00.jpg,5,6\n")
    assert read_ids(tmp_path / "one_row.txt") == ["inst/query/Q000_00.jpg"]
    assert read_ids(tmp_path / "one_row.txt", column=2) == ["6"]
    (tmp_path / "one_col.txt").write_text("a/query/T000.txt\n\nb/query/T001.txt")
    assert read_ids(tmp_path / "one_col.txt") == ["a/query/T000.txt", "b/query/T001.txt"]
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write("shard/key1\nshard/key2\n")
    assert read_ids(tmp_path / "d.txt.gz") == ["shard/key1", "shard/key2"]
    with pytest.raises(DataError, match="line 1 has no column 1"):
        read_ids(tmp_path / "one_col.txt", column=1)
    with pytest.raises(NotFoundError):
        read_ids(tmp_path / "missing.txt")
    assert instance_of("bold_bimp_000/pos/P000_00.jpg") == "bold_bimp_000"
    assert key_of("yfcc100m_00012/abcdef") == "abcdef" and key_of("abcdef") == "abcdef"


def test_features_and_taxonomy(ilias):
    ids, feats = read_features(ilias.root / "features_text_queries.hdf5")
    assert ids == ilias.text_queries and feats.dtype == np.float16
    coarse = read_taxonomy(ilias.root / "misc" / "taxonomy.json")
    assert coarse == {"inst_a_000": "toy", "inst_b_001": "art", "inst_c_002": "art"}


@pytest.mark.parametrize("mini", [False, True])
def test_import_gallery_keeps_positives_then_distractors(ilias, tmp_path, mini):
    mini_ids = ilias.root / "image_ids" / "mini_ilias_yfcc100m_ids.txt" if mini else None
    eset = import_gallery(
        ilias.root, tmp_path / "g", mini_ids=mini_ids, shard_rows=8, progress=False
    )
    meta = eset.metadata(np.arange(eset.rows))
    ids = meta.column("id").to_pylist()
    want = [
        g for g in ilias.gallery_ids if "/pos/" in g or not mini or key_of(g) in ilias.mini_keys
    ]
    assert ids == want  # positives first, then distractor files in numeric order
    assert len(eset.shards) > 2  # written in bounded shards
    inst = meta.column("instance").to_pylist()
    assert inst == [instance_of(g) if "/pos/" in g else "" for g in want]
    stored = eset.gather(np.arange(eset.rows)).astype(np.float32)
    source = ilias.gallery_vectors[[ilias.gallery_ids.index(g) for g in want]].astype(np.float32)
    assert np.abs(stored - source).max() < 2e-3  # the same fp16 vectors (renormalised)


@pytest.mark.parametrize(("track", "mini"), [("i2i", False), ("t2i", False), ("i2i", True),
                                             ("t2i", True)])  # fmt: skip
def test_map_at_1k_matches_the_official_estimator(ilias, tmp_path, track, mini):
    ev = IliasEvaluator(ilias.root, track=track, mini=mini, cache=tmp_path)
    result = ev.evaluate(None, mode="scan")
    queries = ilias.image_queries if track == "i2i" else ilias.text_queries
    assert result.per_query["query_id"] == queries
    assert result.per_query["ap@1000"] == pytest.approx(
        ilias_oracle(ilias, queries, mini), abs=1e-9
    )
    assert result.protocol == f"{'mini-' if mini else ''}ilias-{track}"
    assert result.metrics["ap@1000"] == pytest.approx(np.mean(result.per_query["ap@1000"]))
    # the oracle (recall@1k): every gallery positive is found; inst_c's unlisted one is not
    recall = [1.0 if not q.startswith("inst_c") else 5 / 6 for q in queries]
    assert result.per_query["r@1000"] == pytest.approx(recall)
    assert any("1 listed positives have no gallery row" in n for n in result.notes)
    # categories average within each instance first (ILIAS's tables)
    art = result.groups["category"]["art"]
    per = dict(zip(queries, result.per_query["ap@1000"], strict=True))
    b = np.mean([v for q, v in per.items() if q.startswith("inst_b")])
    c = np.mean([v for q, v in per.items() if q.startswith("inst_c")])
    assert art["ap@1000"] == pytest.approx((b + c) / 2) and art["units"] == 2


def test_model_in_every_mode_and_the_gallery_cache(ilias, tmp_path):
    torch.manual_seed(3)
    model = QuARIModel(tiny_config("reference")).eval()
    ev = IliasEvaluator(ilias.root, track="i2i", mini=True, cache=tmp_path, k=10)
    folder = ev.gallery.root
    assert (folder / SOURCE_FILE).is_file()
    vectors = ev.gallery.gather(np.arange(ev.gallery.rows)).astype(np.float32)
    queries = ev.queries()
    with torch.no_grad():
        oracle = dense_scores(model(torch.from_numpy(queries.embeddings)), vectors)
    for mode in ("rerank", "adaptive", "scan"):
        result = ev.evaluate(model, mode=mode, candidates=ev.gallery.rows)
        for i in range(len(queries)):
            order = np.argsort(-oracle[i], kind="stable")
            labels = np.isin(order, queries.relevant[i]).astype(int)
            want = official_ap(labels, oracle[i, order], int(queries.n_relevant[i]), 10)
            assert result.per_query["ap@10"][i] == pytest.approx(want, abs=1e-6), mode
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    again = IliasEvaluator(ilias.root, track="t2i", mini=True, cache=tmp_path)
    assert again.gallery.root == folder  # no re-import
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    full = IliasEvaluator(ilias.root, track="t2i", mini=False, cache=tmp_path)
    assert full.gallery.root != folder and full.gallery.rows > again.gallery.rows


def test_one_line_text_id_file_and_missing_pieces(tmp_path):
    fx = write_ilias(tmp_path / "data", one_row_text_ids=True, taxonomy=False)
    ev = IliasEvaluator(fx.root, track="t2i", cache=tmp_path / "cache")
    result = ev.evaluate(None, mode="scan")
    assert result.queries == 1 and result.groups == {}
    assert result.per_query["ap@1000"] == pytest.approx(ilias_oracle(fx, fx.text_queries, False))
    with pytest.raises(QuARIInputError, match="tracks are i2i and t2i"):
        IliasEvaluator(fx.root, track="x2y")
    (fx.root / "image_ids" / "mini_ilias_yfcc100m_ids.txt").unlink()
    with pytest.raises(NotFoundError, match="mini-ILIAS id list"):
        _ = IliasEvaluator(fx.root, mini=True, cache=tmp_path / "cache").gallery
    (fx.root / "image_ids" / "text_query_ids.txt").write_text("inst_z_009/query/T009.txt\n")
    with pytest.raises(DataError, match="no features for query 'inst_z_009"):
        IliasEvaluator(fx.root, track="t2i", cache=tmp_path / "cache").evaluate(None)
