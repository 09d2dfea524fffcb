"""Tiny benchmark fixtures written in exactly the official formats (INQUIRE, INQUIRE-Rerank,
ILIAS), with the edge cases of BENCHMARKS §5.2, and an oracle that scores rankings the way the
official scripts do (scikit-learn on the top k, rescaled by hits / min(R, k)).

Geometry (E = 24): query j is the basis vector e_j (j < 12). A gallery row "homed" at query j
is s·e_j + √(1−s²)·u with u a random unit vector in span(e_12 … e_23), so its cosine with
query j is s and with every other query 0; background rows are u alone. Each query's ranking
is therefore known from the s levels alone.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.metrics import average_precision_score

DIM = 24
SUPERCATEGORIES = ("Appearance", "Behavior", "Context", "Species")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def homed(rng: np.random.Generator, query: int | None, s: float) -> np.ndarray:
    """A unit vector with cosine ``s`` to e_query and 0 to every other query direction."""
    u = np.zeros(DIM)
    u[12:] = _unit(rng.standard_normal(12))
    if query is None:
        return u
    x = np.sqrt(1 - s * s) * u
    x[query] = s
    return x


def official_ap(labels_by_rank: np.ndarray, scores: np.ndarray, R: int, k: int) -> float:
    """INQUIRE ``ap_at_k`` / ILIAS ``_compute_AP``: sklearn AP of the top k × hits / min(R, k)."""
    y, s = np.asarray(labels_by_rank[:k]), np.asarray(scores[:k])
    hits = int(y.sum())
    if hits == 0:
        return 0.0
    return float(average_precision_score(y, s) * hits / min(R, k))


class TableEncoder:
    """A fake encoder: texts are looked up in a table; images map to a fixed random
    projection of their 4×4 thumbnail. Outputs are unit float32, like every Encoder."""

    def __init__(self, texts: dict[str, np.ndarray] | None = None, dim: int = DIM) -> None:
        self.id = "fixture-encoder"
        self.dim = dim
        self.info: dict[str, Any] = {}
        self.texts = texts or {}
        self.proj = np.random.default_rng(7).standard_normal((48, dim))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return _unit(np.stack([self.texts[t] for t in texts])).astype(np.float32)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        thumbs = [np.asarray(im.resize((4, 4)), np.float64).reshape(-1) / 255 for im in images]
        return _unit(np.stack(thumbs) @ self.proj + 0.1).astype(np.float32)


def png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# -- INQUIRE-Fullrank --------------------------------------------------------------------------
@dataclass
class InquireFixture:
    root: Path
    key: str
    query_ids: dict[str, list[str]]  # split → ids
    texts: dict[str, str]  # query id → text
    vectors: dict[str, np.ndarray]  # query id → embedding
    golden: dict[str, dict[str, Any]] = field(default_factory=dict)  # query id → expectations

    @property
    def gallery(self) -> Path:
        return self.root / "data" / "inat24" / "embs" / self.key

    @property
    def query_embeddings(self) -> Path:
        return self.root / "query_embeddings.parquet"


def write_inquire(root: Path, key: str = "fixture-vit", seed: int = 0) -> InquireFixture:
    """The official layout: queries CSVs (unnamed index column), annotations, a two-shard
    clip-retrieval embedding folder whose image_path lacks ``.jpg``.

    Test queries (k = 5 goldens, ranks by cosine):

    * ``101``: positives at ranks 1, 3 and 7 → top-5 relevance [1, 0, 1, 0, 0], R = 3,
      AP@5 = (1 + 2/3) / 3 = 0.555556 (BENCHMARKS case A);
    * ``102``: positives at ranks 1 and 3 plus 8 further positives at ranks 6 … 9 and 4 not in
      the gallery: R = 10 (mostly outside the top 5), AP@5 = (1 + 2/3) / 5 = 0.333333 (case B);
    * ``103``: positives only at ranks 6 … 8: 0 hits in the top 5, AP@5 = 0;
    * nine more queries (three per supercategory in all) with one positive at rank 2.
    """
    rng = np.random.default_rng(seed)
    data = root / "data" / "inquire"
    data.mkdir(parents=True)
    levels = np.round(np.linspace(0.95, 0.5, 10), 3)  # 10 distinct cosines, rank 1 … 10
    test_ids = [str(101 + j) for j in range(12)]
    val_ids = [str(301 + j) for j in range(4)]
    rows, paths, positives = [], [], []  # gallery vectors, image paths, (query, path)
    pos_ranks = {"101": [1, 3, 7], "102": [1, 3, 6, 7, 8, 9], "103": [6, 7, 8]}

    def image_path(n: int) -> str:
        return f"train/{n % 7:05d}_Animalia_Chordata_Aves_Fixture_{n % 7}/{rng.bytes(6).hex()}"

    for j, qid in enumerate(test_ids):
        for rank, s in enumerate(levels[: 10 if j < 3 else 3], start=1):
            rows.append(homed(rng, j, s))
            paths.append(image_path(len(paths)))
            if rank in pos_ranks.get(qid, [2]):
                positives.append((qid, paths[-1]))
    for n in range(4):  # 102's positives that the gallery does not hold
        positives.append(("102", f"train/00009_Missing/{n:04d}"))
    for j, qid in enumerate(val_ids):  # validation queries reuse directions 8 … 11
        positives.append((qid, paths[-3 * (4 - j)]))  # that query's own rank-1 row
    for _ in range(12):
        rows.append(homed(rng, None, 0.0))
        paths.append(image_path(len(paths)))
    vectors = _unit(np.asarray(rows)).astype(np.float16)
    gallery = root / "data" / "inat24" / "embs" / key
    (gallery / "img_emb").mkdir(parents=True)
    (gallery / "metadata").mkdir()
    cut = 41  # two shards, the second starting mid-query
    for i, part in enumerate((slice(0, cut), slice(cut, None))):
        np.save(gallery / "img_emb" / f"img_emb_{i}.npy", vectors[part])
        pq.write_table(
            pa.table({"image_path": paths[part], "caption": [None] * len(paths[part])}),
            gallery / "metadata" / f"metadata_{i}.parquet",
        )
    texts, qvec = {}, {}
    for split, ids in (("test", test_ids), ("val", val_ids)):
        lines = [",query_id,query_text,supercategory,category,iconic_group"]
        for i, qid in enumerate(ids):
            texts[qid] = f"fixture query {qid}: a bird doing thing {i}"
            j = test_ids.index(qid) if split == "test" else 8 + i
            qvec[qid] = np.eye(DIM)[j].astype(np.float32)
            sc = SUPERCATEGORIES[i % 4]
            group = "" if i == 5 else "Birds"  # an empty iconic_group, as in the release
            lines.append(f'{i},{qid},"{texts[qid]}",{sc},Some Category,{group}')
        (data / f"inquire_queries_{split}.csv").write_text("\n".join(lines) + "\n")
    lines = ["query_id,image_id,image_path"]
    lines += [f"{q},{n},{p}.jpg" for n, (q, p) in enumerate(positives)]
    (data / "inquire_annotations.csv").write_text("\n".join(lines) + "\n")
    ids = test_ids + val_ids
    pq.write_table(
        pa.table(
            {
                "query_id": ids,
                "embedding": pa.array([qvec[q] for q in ids], pa.list_(pa.float32())),
            }
        ),
        root / "query_embeddings.parquet",
    )
    golden = {
        "101": {"ap@5": (1 + 2 / 3) / 3, "R": 3},
        "102": {"ap@5": (1 + 2 / 3) / 5, "R": 10},
        "103": {"ap@5": 0.0, "R": 3},
    }
    return InquireFixture(root, key, {"test": test_ids, "val": val_ids}, texts, qvec, golden)


# -- INQUIRE-Rerank ----------------------------------------------------------------------------
@dataclass
class RerankFixture:
    release: Path
    queries: list[str]
    image_embeddings: Path
    query_embeddings: Path
    encoder: TableEncoder


def write_rerank(root: Path, n_queries: int = 4, seed: int = 0) -> RerankFixture:
    """``data/{validation,test}-00000-of-00001.parquet`` with the 17 columns and dtypes of the
    release, exactly 100 rows per query, candidates shared between queries, ``image`` as the HF
    Image struct {bytes, path} holding tiny PNGs; and keyed embedding files made by the
    fixture encoder from the same PNGs."""
    rng = np.random.default_rng(seed)
    encoder = TableEncoder()
    images = {i: png(i) for i in range(1000, 1000 + 60 * n_queries)}
    image_ids = sorted(images)
    vectors = dict(
        zip(
            image_ids,
            encoder.encode_images([Image.open(io.BytesIO(images[i])) for i in image_ids]),
            strict=True,
        )
    )
    (root / "data").mkdir(parents=True)
    queries: list[str] = []
    for split, count in (("validation", 2), ("test", n_queries)):
        table: dict[str, list[Any]] = {c: [] for c in _RERANK_TYPES}
        for q in range(count):
            text = f"{split} query {q}: a heron with a fish"
            if split == "test":
                queries.append(text)
            encoder.texts[text] = rng.standard_normal(DIM)
            chosen = rng.choice(image_ids, 100, replace=False)  # overlaps across queries
            labels = (rng.random(100) < 0.2).astype(np.int64)
            labels[0] = 1  # at least one positive
            for i, (image_id, rel) in enumerate(zip(chosen, labels, strict=True)):
                row = {
                    "image": {"bytes": images[int(image_id)], "path": f"{image_id}.png"},
                    "query": text,
                    "relevant": int(rel),
                    "clip_score": float(1.0 - i / 100),
                    "inat24_image_id": int(image_id),
                    "inat24_file_name": f"train/00001_X/{image_id}.jpg",
                    "supercategory": SUPERCATEGORIES[q % 4],
                    "category": "Cat",
                    "iconic_group": "Birds",
                    "inat24_species_id": 1,
                    "inat24_species_name": "Ardea alba",
                    "latitude": 1.0,
                    "longitude": 2.0,
                    "location_uncertainty": None,
                    "date": "2021-05-01",
                    "license": "CC-BY",
                    "rights_holder": "someone",
                }
                for c in _RERANK_TYPES:
                    table[c].append(row[c])
        schema = pa.schema([(c, t) for c, t in _RERANK_TYPES.items()])
        pq.write_table(
            pa.table(table, schema=schema), root / "data" / f"{split}-00000-of-00001.parquet"
        )
    image_file = root / "image_embeddings.parquet"
    pq.write_table(
        pa.table(
            {
                "inat24_image_id": pa.array(image_ids, pa.int64()),
                "embedding": pa.array([vectors[i] for i in image_ids], pa.list_(pa.float32())),
            }
        ),
        image_file,
    )
    query_file = root / "query_embeddings.parquet"
    names = list(encoder.texts)
    pq.write_table(
        pa.table(
            {
                "query": names,
                "embedding": pa.array(list(encoder.encode_texts(names)), pa.list_(pa.float32())),
            }
        ),
        query_file,
    )
    return RerankFixture(root, queries, image_file, query_file, encoder)


_RERANK_TYPES = {
    "image": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    "query": pa.string(),
    "relevant": pa.int64(),
    "clip_score": pa.float64(),
    "inat24_image_id": pa.int64(),
    "inat24_file_name": pa.string(),
    "supercategory": pa.string(),
    "category": pa.string(),
    "iconic_group": pa.string(),
    "inat24_species_id": pa.int64(),
    "inat24_species_name": pa.string(),
    "latitude": pa.float64(),
    "longitude": pa.float64(),
    "location_uncertainty": pa.float64(),
    "date": pa.string(),
    "license": pa.string(),
    "rights_holder": pa.string(),
}


# -- ILIAS -------------------------------------------------------------------------------------
@dataclass
class IliasFixture:
    root: Path
    instances: list[str]
    image_queries: list[str]
    text_queries: list[str]
    positives: dict[str, list[str]]
    mini_keys: set[str]
    query_vectors: dict[str, np.ndarray]
    gallery_ids: list[str]  # full gallery in import order
    gallery_vectors: np.ndarray  # (N, E) fp16 as stored in the HDF5 files


def _write_h5(path: Path, ids: list[str], vectors: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("index", data=np.asarray(ids, dtype="S"))  # ascii strings
        f.create_dataset("features", data=np.asarray(vectors, np.float16))


def write_ilias(
    root: Path, seed: int = 0, one_row_text_ids: bool = False, taxonomy: bool = True
) -> IliasFixture:
    """The release layout: id lists (``image_query_ids.txt`` with extra columns,
    ``text_query_ids.txt``, ``positive_ids.txt`` as id,scale,clutter, the gzipped distractor
    list, the mini-ILIAS list with and without shard prefixes), ``misc/taxonomy.json``, and
    HDF5 features (ascii ``index``, fp16 ``features``) in two distractor files.

    Instance i's queries point along e_i; its positives sit at cosines 0.9, 0.6, 0.3 …, so
    every instance has positives the top of the list misses once distractors (cosines drawn in
    (0.2, 0.85) to the queries) are added. Instance ``inst_c`` has a listed positive that no
    feature file holds (R counts it).
    """
    rng = np.random.default_rng(seed)
    instances = ["inst_a_000", "inst_b_001", "inst_c_002"]
    (root / "image_ids").mkdir(parents=True)
    (root / "misc").mkdir()
    image_queries = [
        f"{instances[0]}/query/Q000_00.jpg",
        f"{instances[0]}/query/Q000_01.jpg",
        f"{instances[1]}/query/Q001_00.jpg",
        f"{instances[2]}/query/Q002_00.jpg",
    ]
    text_queries = [f"{inst}/query/T{i:03d}.txt" for i, inst in enumerate(instances)]
    if one_row_text_ids:
        text_queries = text_queries[:1]
    qvec: dict[str, np.ndarray] = {}
    for q in image_queries + text_queries:
        i = instances.index(q.split("/")[0])
        qvec[q] = _unit(np.eye(DIM)[i] + 0.05 * rng.standard_normal(DIM)).astype(np.float16)
    positives, pos_vectors, pos_lines = {}, [], []
    for i, inst in enumerate(instances):
        n = 3 + i
        positives[inst] = [f"{inst}/pos/P{i:03d}_{p:02d}.jpg" for p in range(n)]
        for p, pid in enumerate(positives[inst]):
            pos_vectors.append(homed(rng, i, 0.9 - 0.3 * p if p < 3 else 0.1))
            pos_lines.append(f"{pid},{0.05 * (p + 1):.4f},{10 * p}")
    listed_only = f"{instances[2]}/pos/P002_99.jpg"  # listed, but in no feature file
    pos_lines.append(f"{listed_only},0.1000,5")
    gallery_ids = [p for inst in instances for p in positives[inst]]
    distractors: list[list[str]] = [[], []]
    dvecs: list[list[np.ndarray]] = [[], []]
    for f in range(2):
        for n in range(15):
            distractors[f].append(f"yfcc100m_{f:05d}/{f}{n:03d}abc")
            x = homed(rng, None, 0)
            x[rng.integers(0, 3)] = rng.uniform(0.2, 0.85)
            dvecs[f].append(x)
    mini_keys = {key.rsplit("/", 1)[1] for key in distractors[0][::2] + distractors[1][1::3]}
    (root / "image_ids" / "image_query_ids.txt").write_text(
        "".join(f"{q},{100 + n},{200 + n}\n" for n, q in enumerate(image_queries))
    )
    (root / "image_ids" / "text_query_ids.txt").write_text("".join(f"{q}\n" for q in text_queries))
    (root / "image_ids" / "positive_ids.txt").write_text("\n".join(pos_lines) + "\n")
    with gzip.open(root / "image_ids" / "distractor_ids.txt.gz", "wt") as f:
        f.write("".join(f"{d}\n" for part in distractors for d in part))
    mini_lines = []
    for n, key in enumerate(sorted(mini_keys)):  # some with their shard prefix, some without
        shard = next(d.split("/")[0] for p in distractors for d in p if d.endswith("/" + key))
        mini_lines.append(f"{shard}/{key}" if n % 2 else key)
    (root / "image_ids" / "mini_ilias_yfcc100m_ids.txt").write_text("\n".join(mini_lines) + "\n")
    if taxonomy:
        tree = {
            "toy": {"plush": {"bears": [instances[0]]}},
            "art": {"sculpture": {"modern": [instances[1], instances[2]]}},
        }
        (root / "misc" / "taxonomy.json").write_text(json.dumps(tree))
    pos16 = _unit(np.asarray(pos_vectors)).astype(np.float16)
    _write_h5(root / "features_positives.hdf5", gallery_ids, pos16)
    _write_h5(root / "features_image_queries.hdf5", image_queries, [qvec[q] for q in image_queries])
    _write_h5(root / "features_text_queries.hdf5", text_queries, [qvec[q] for q in text_queries])
    stored = [pos16]
    for f in range(2):
        v16 = _unit(np.asarray(dvecs[f])).astype(np.float16)
        _write_h5(root / f"features_distractors_{f:05d}.hdf5", distractors[f], v16)
        stored.append(v16)
        gallery_ids += distractors[f]
    return IliasFixture(
        root,
        instances,
        image_queries,
        text_queries,
        {**positives, instances[2]: [*positives[instances[2]], listed_only]},
        mini_keys,
        qvec,
        gallery_ids,
        np.concatenate(stored),
    )


def ilias_oracle(fx: IliasFixture, queries: list[str], mini: bool, k: int = 1000) -> list[float]:
    """Per-query AP as ILIAS's evaluate.py computes it, by brute force over the stored fp16
    gallery (re-normalised in float64, as quari stores rows)."""
    keep = [
        i
        for i, g in enumerate(fx.gallery_ids)
        if "/pos/" in g or not mini or g.rsplit("/", 1)[1] in fx.mini_keys
    ]
    ids = [fx.gallery_ids[i] for i in keep]
    vecs = _unit(fx.gallery_vectors[keep].astype(np.float64))
    out = []
    for q in queries:
        scores = vecs @ _unit(fx.query_vectors[q].astype(np.float64))
        order = np.argsort(-scores, kind="stable")
        inst = q.split("/")[0]
        labels = np.asarray([ids[i].split("/")[0] == inst for i in order], dtype=int)
        out.append(official_ap(labels, scores[order], len(fx.positives[inst]), k))
    return out
