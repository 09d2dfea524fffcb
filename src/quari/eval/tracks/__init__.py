"""Real-image evaluation tracks built from Fashion-MNIST and the ``offline`` encoder.

:func:`build_fashion_tracks` makes two tracks over disjoint train / val / test images (train and
val from Fashion-MNIST's training split, test from its test split; nothing is fitted on val or
test):

* **text→image, fine-grained** (``t2i``): a query names a class and 1-3 attributes measured
  from the pixels (tone, coverage, texture, symmetry, silhouette — :mod:`.attributes`), worded
  differently at training, validation and test time (:mod:`.templates`); the relevant images
  are those of that class whose every stated attribute matches.
* **image→image, instance-level** (``i2i``, like ILIAS): a query is a transformed view (crop,
  rotation, contrast, noise — :mod:`.views`) of a held-out item; its positives are other views
  of the same item; every other image of the split is a distractor.

Images are embedded once by EfficientNet-Lite0; a ridge head fitted on the train images and
their training captions maps them into all-MiniLM-L6-v2's space, and is saved so that
``load_encoder("offline:<out>/head")`` encodes new queries into the same space.

Output layout (a contract other modules read)::

    <out>/head/                          the fitted offline head (config.json + head.safetensors)
    <out>/train/                         EmbeddingSet: img_emb = train images, text_emb = their
                                         training captions (one row per caption, the image row
                                         repeated); metadata: item, split, source, label,
                                         class_name, tone, coverage, texture, symmetry,
                                         silhouette, caption, path
    <out>/{t2i,i2i}/{val,test}/gallery/  EmbeddingSet per track and split; metadata: item,
                                         (view: i2i), split, source, label, class_name, the
                                         attributes, path
    <out>/{t2i,i2i}/{val,test}/queries.parquet   custom queries: query_id, label (the text, or
                                         the query view's PNG relative to this folder),
                                         embedding (list<float32>, in the head's space),
                                         relevant (list<int64> gallery rows), group (class)
    <out>/images/                        PNGs: fmnist-train/, fmnist-t10k/ (28×28 originals),
                                         views/{val,test}/<item>-<view>.png (view 0 = query)
    <out>/track.json                     settings, sizes, templates, thresholds, encoder id,
                                         dataset digests, head stats, build seconds
    <out>/cache/                         features_*.npy / text_*.npy: encoder outputs reused by
                                         a rerun

``item`` is the index in Fashion-MNIST's own file (``source`` says which: ``fashion-mnist/train``
or ``fashion-mnist/t10k``); ``path`` is relative to the set's folder. The attributes of an i2i
view are those of its original image.

Example:
    >>> from quari.eval.tracks import build_fashion_tracks
    >>> info = build_fashion_tracks("tracks/small", size="small")  # doctest: +SKIP
    >>> info["tracks"]["t2i"]["test"]["queries"]  # doctest: +SKIP
    200
"""

from quari.eval.tracks.attributes import ATTRIBUTES, AttributeThresholds, measure
from quari.eval.tracks.build import SIZES, TrackSizes, build_fashion_tracks
from quari.eval.tracks.fashion_mnist import CLASS_NAMES, FashionMNIST, load_fashion_mnist
from quari.eval.tracks.judgements import instance_plan, text_queries
from quari.eval.tracks.templates import TEMPLATE_SETS, render

__all__ = [
    "ATTRIBUTES",
    "CLASS_NAMES",
    "SIZES",
    "TEMPLATE_SETS",
    "AttributeThresholds",
    "FashionMNIST",
    "TrackSizes",
    "build_fashion_tracks",
    "instance_plan",
    "load_fashion_mnist",
    "measure",
    "render",
    "text_queries",
]
