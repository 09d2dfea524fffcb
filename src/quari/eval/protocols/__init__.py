"""Evaluation protocols: official benchmarks and your own labelled queries.

* :mod:`~quari.eval.protocols.inquire` — INQUIRE-Fullrank (AP@50 over the whole gallery) and
  INQUIRE-Rerank (AP over the fixed 100 candidates).
* :mod:`~quari.eval.protocols.ilias` — ILIAS and mini-ILIAS, image→image and text→image,
  mAP@1k (``[eval]`` extra: h5py).
* :mod:`~quari.eval.protocols.custom` — a parquet file of queries and their relevant rows.
* :mod:`~quari.eval.protocols.base` — the shared :class:`Evaluator`, :class:`QuerySet` and the
  :class:`EvalResult` record that ``quari eval`` writes and ``quari eval report`` reads.

Every evaluator runs methods through :class:`quari.retriever.Retriever` and scores them with
:mod:`quari.eval.metrics`.
"""

from quari.eval.protocols.base import (
    EvalResult,
    Evaluator,
    QuerySet,
    describe_method,
    environment,
    group_means,
    load_results,
    save_results,
)
from quari.eval.protocols.custom import CustomEvaluator
from quari.eval.protocols.ilias import IliasEvaluator
from quari.eval.protocols.inquire import InquireFullrank, InquireRerank

__all__ = [
    "CustomEvaluator",
    "EvalResult",
    "Evaluator",
    "IliasEvaluator",
    "InquireFullrank",
    "InquireRerank",
    "QuerySet",
    "describe_method",
    "environment",
    "group_means",
    "load_results",
    "save_results",
]
