"""The end-to-end demo behind ``quari demo`` / ``make demo``: real images in, a report out.

On a fresh machine it gets Fashion-MNIST, builds the real-image tracks (fitting the ``offline``
encoder's head and embedding every image once), indexes the test galleries, mines
semi-positives, trains QuARI with the default recipe and the linear-adapter baseline, evaluates
both tracks' test queries against the frozen backbone, and writes ``report.html``. Each stage
is reused by a rerun with the same settings. See :mod:`quari.demo.pipeline` for the stages and
:data:`~quari.demo.config.DEMO_SIZES` for the sizes.

Output layout (``demo-out/`` by default)::

    report.html, report.json     the page (table, side-by-side results, plots, timings) + data
    demo.json                    settings and every stage's wall / CPU time and load
    stages/<stage>.json          each stage's settings key and record (what a rerun reuses)
    tracks/                      the Fashion-MNIST tracks (:mod:`quari.eval.tracks` layout),
                                 with index/ beside each test gallery, semipos/ beside train/
    model/                       the QuARI run (model folder, checkpoints, logs)
    linear/                      the linear adapter
    eval/                        results.json, report.md and the plots

Example:
    >>> from quari.demo import DemoConfig, run_demo
    >>> result = run_demo(DemoConfig(out="demo-out", size="small"))  # doctest: +SKIP
    >>> result.serve  # doctest: +SKIP
    'quari serve demo-out/tracks/t2i/test/gallery --model demo-out/model --encoder offline:…'
"""

from quari.demo.config import DEFAULT_SIZE, DEMO_SIZES, DemoConfig, DemoSize
from quari.demo.pipeline import DemoResult, run_demo, serve_command
from quari.demo.report import demo_table

__all__ = [
    "DEFAULT_SIZE",
    "DEMO_SIZES",
    "DemoConfig",
    "DemoResult",
    "DemoSize",
    "demo_table",
    "run_demo",
    "serve_command",
]
