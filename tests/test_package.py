"""The public API is importable as documented."""

import quari
import quari.checkpoint


def test_public_api():
    from quari import Adaptation, HyperNetConfig, QuARIModel

    assert {Adaptation, HyperNetConfig, QuARIModel} <= {getattr(quari, n) for n in quari.__all__}
    assert callable(quari.checkpoint.load_reference)
    assert callable(quari.checkpoint.save) and callable(quari.checkpoint.load)
    assert quari.__version__
