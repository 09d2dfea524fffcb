"""The QuARI hypernetwork: a query embedding in, a query-specific low-rank map out.

A transformer reads one *control token* (the encoded query) and two banks of ``rank`` tokens,
refines the banks over ``num_steps`` residual steps, and decodes them into the columns of two
E×r factors ``U`` (writes the output space) and ``V`` (reads the input space). The control
token is decoded into the adapted query q′. See ``docs/method.md`` §3 (the
hypernetwork) and §4 (the scoring math).

Two variants share the module:

``"paper"`` (the default) follows the paper: T = U Vᵀ (pure rank r), q′ = normalize(MLP(ctx)),
a learned step embedding, decoders with LayerNorm. The token banks start at zero as in the paper
but the whole sequence [ctx; U; V] gets sinusoidal positions 0..2r, so that the U and V banks
receive different inputs and do not stay identical (``docs/method.md`` §3.2, §6 A10 — with
shared positions the permutation-equivariant transformer updates both banks identically).

``"reference"`` reproduces the released checkpoints of the reference implementation
(``docs/method.md`` §3.3, §3.4): T = I + α Û V̂ᵀ with Frobenius-normalised factors,
q′ = normalize((1−λ) MLP(ctx) + λq), a sinusoidal step code through an MLP, shared positions
pe[0:r] on both banks, and 5 % token dropout while training. Load such checkpoints with
:func:`quari.checkpoint.load_reference`. At inference its V bank equals its U bank at every
step, so the pass folds it away (``docs/method.md`` §3.5).

Either variant can map the query instead of decoding it (``map_query``: q′ = normalize(T q),
so the score is cos(T q, T d); quari's default training recipe, ``docs/method.md`` §5.5).
"""

from quari.hypernet.config import SIZE_CEILINGS, HyperNetConfig
from quari.hypernet.layers import LINEAR_ROLES, LinearFn
from quari.hypernet.model import QuARIModel

__all__ = ["LINEAR_ROLES", "SIZE_CEILINGS", "HyperNetConfig", "LinearFn", "QuARIModel"]
