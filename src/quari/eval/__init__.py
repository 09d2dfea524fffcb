"""Evaluation: metrics, benchmark protocols, baselines, reports and synthetic data.

* :mod:`~quari.eval.metrics` — the one implementation of every retrieval metric.
* :mod:`~quari.eval.protocols` — INQUIRE-Fullrank/Rerank, ILIAS/mini-ILIAS, custom queries;
  evaluators that run methods through the Retriever and the ``EvalResult`` record.
* :mod:`~quari.eval.baselines` — αQE (a query adapter) and αDBA (a gallery transformation).
* :mod:`~quari.eval.linear` — training the linear-adaptation baseline
  (:class:`quari.adapters.LinearAdapter`).
* :mod:`~quari.eval.methods` — the method specs ``quari eval --model`` takes.
* :mod:`~quari.eval.report` — markdown tables and plots from results.
* :mod:`~quari.eval.synthetic` — clustered and planted synthetic data.
"""
