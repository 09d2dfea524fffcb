"""quari: query-adaptive retrieval (QuARI) over frozen vision–language embedding spaces.

Example:
    >>> import torch
    >>> from quari import HyperNetConfig, QuARIModel
    >>> model = QuARIModel(HyperNetConfig(embedding_dim=64, rank=8, hidden_dim=32,
    ...                                   num_layers=1, num_heads=4, num_steps=2)).eval()
    >>> with torch.inference_mode():
    ...     adaptation = model(torch.randn(2, 64))
    ...     scores = adaptation.score(torch.randn(100, 64))
    >>> scores.shape
    torch.Size([2, 100])
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quari")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

from quari.adaptation import Adaptation, TopK
from quari.errors import QuARIError, QuARIInputError
from quari.hypernet import HyperNetConfig, QuARIModel

__all__ = [
    "Adaptation",
    "HyperNetConfig",
    "QuARIError",
    "QuARIInputError",
    "QuARIModel",
    "TopK",
    "__version__",
]
