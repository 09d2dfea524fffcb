"""Model folders: save and load QuARI models, and import reference checkpoints.

A quari model folder holds three files::

    config.json         {"format": "quari-model", "format_version": 1, "quari_version": …,
                         "config": HyperNetConfig fields, "metadata": {encoder, data, metrics …}}
    model.safetensors   the state dict (no pickle)
    README.md           a model card generated from the two above

The reference implementation (mvrl/QuARI) ships ``config.yml`` (constructor arguments under
``hparams``) and ``weights.pt`` (a state dict). :func:`load_reference` imports those into the
``"reference"`` variant; the weights are read with ``torch.load(weights_only=True)`` so a
malicious pickle cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from quari import __version__
from quari.errors import CheckpointError
from quari.fileio import atomic_write, read_json
from quari.hypernet import HyperNetConfig, QuARIModel

__all__ = ["CheckpointError", "load", "load_reference", "save"]

FORMAT = "quari-model"
FORMAT_VERSION = 1

# Reference hyper-parameter names → HyperNetConfig fields.
_REFERENCE_HPARAMS = {
    "embedding_dim": "embedding_dim",
    "low_rank_dim": "rank",
    "hidden_dim": "hidden_dim",
    "num_steps": "num_steps",
    "nhead": "num_heads",
    "num_layers": "num_layers",
    "dropout": "dropout",
    "query_residual_weight": "query_residual_weight",
    "use_fro_norm": "normalize_factors",
    "anchor_scale": "anchor_scale",
}
# Reference state-dict prefixes → this package's module names. The reference's "U" factor reads
# the input (d·Û in its row convention), which is this package's V (T d = U Vᵀ d), and vice versa.
_REFERENCE_KEYS = {
    "step_proj.": "step_mlp.",
    "dec_u_img.": "v_decoder.",
    "dec_v_img.": "u_decoder.",
    "pos_emb": "positions",
    "pos_scale": "position_scale",
}


def save(model: QuARIModel, folder: str | os.PathLike[str]) -> Path:
    """Writes ``model`` as a model folder (created if needed; existing files replaced atomically).

    Args:
        model: The model; ``model.metadata`` (encoder id, training data, metrics …) is saved
            with it and rendered into the model card.
        folder: Destination folder.

    Returns:
        The folder path.

    Example:
        >>> path = save(model, "models/siglip2-l-quari")  # doctest: +SKIP
        >>> load(path).config == model.config  # doctest: +SKIP
        True
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quari_version": __version__,
        "config": model.config.to_dict(),
        "metadata": model.metadata,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda f: f.write(save_safetensors(state)))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "config.json", lambda f: f.write(text.encode()))
    atomic_write(folder / "README.md", lambda f: f.write(_model_card(model).encode()))
    return folder


def load(folder: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> QuARIModel:
    """Loads a model folder written by :func:`save`, in eval mode.

    Args:
        folder: The model folder.
        map_location: Device for the weights.

    Returns:
        The model, with ``model.metadata`` restored.

    Raises:
        CheckpointError: missing files, corrupt JSON or safetensors, a newer format version,
            unknown config fields, or weights whose keys or shapes do not fit the config.
    """
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; a quari model folder needs config.json and model.safetensors"
            )
    data = read_json(config_path, CheckpointError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f'{config_path}: not a quari model config (expected "format": "{FORMAT}")'
        )
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format_version {version!r} is newer than this quari supports "
            f"({FORMAT_VERSION}); upgrade quari (this is {__version__})"
        )
    config = _config_from(data.get("config"), config_path)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{weights_path}: unreadable or corrupt safetensors file ({exc})"
        ) from exc
    model = _build(config, state, weights_path)
    model.metadata = dict(data.get("metadata") or {})
    return model.to(map_location)


def load_reference(folder: str | os.PathLike[str]) -> QuARIModel:
    """Imports a reference-implementation checkpoint (``config.yml`` + ``weights.pt``).

    Args:
        folder: Folder holding ``config.yml`` (with ``hparams``) and ``weights.pt``.

    Returns:
        A ``"reference"``-variant :class:`QuARIModel` in eval mode that reproduces the
        reference outputs (q′ and scores) to float32 rounding.

    Raises:
        CheckpointError: missing files, unknown hyper-parameters, a file that is not a plain
            state dict, or missing/unexpected/misshapen weights.

    Example:
        >>> model = load_reference("../shared/fixtures/official-small")  # doctest: +SKIP
    """
    folder = Path(folder)
    config_path, weights_path = folder / "config.yml", folder / "weights.pt"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; a reference checkpoint needs config.yml and weights.pt"
            )
    try:
        meta = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{config_path}: not valid YAML ({exc})") from exc
    hparams = meta.get("hparams") if isinstance(meta, dict) else None
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{config_path}: expected a mapping with an 'hparams' section")
    unknown = sorted(set(hparams) - set(_REFERENCE_HPARAMS))
    if unknown:
        raise CheckpointError(
            f"{config_path}: unknown reference hparams {unknown}; known: "
            f"{sorted(_REFERENCE_HPARAMS)}"
        )
    fields = {_REFERENCE_HPARAMS[k]: v for k, v in hparams.items()}
    config = _config_from({**fields, "variant": "reference"}, config_path)
    try:
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/unsafe pickles
        raise CheckpointError(
            f"{weights_path}: cannot be read as a plain state dict ({exc})"
        ) from exc
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{weights_path}: expected a state dict of tensors")
    state = {_rename_reference_key(k): v for k, v in raw.items()}
    model = _build(config, state, weights_path)
    model.metadata = {"source": "reference checkpoint", "imported_from": str(folder)}
    if meta.get("note"):
        model.metadata["note"] = meta["note"]
    return model


def _rename_reference_key(key: str) -> str:
    for old, new in _REFERENCE_KEYS.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _config_from(fields: Any, where: Path) -> HyperNetConfig:
    if not isinstance(fields, dict):
        raise CheckpointError(f"{where}: missing the model config mapping")
    try:
        return HyperNetConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid model config: {exc}") from exc


def _build(config: HyperNetConfig, state: dict[str, torch.Tensor], where: Path) -> QuARIModel:
    """Creates the model for ``config`` and loads ``state`` strictly, with named mismatches."""
    model = QuARIModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not fit the config ({config.variant} variant): "
            f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{where}: weight {key!r} has shape {tuple(state[key].shape)}, the config "
                f"expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _model_card(model: QuARIModel) -> str:
    cfg, meta = model.config, model.metadata
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.variant == "paper":
        form = f"T = U Vᵀ (rank {cfg.rank})"
    else:
        form = f"T = I + {cfg.anchor_scale:.3g}·Û V̂ᵀ (rank {cfg.rank})"
    lines = [
        "---",
        "library_name: quari",
        "tags: [quari, retrieval, query-adaptive, hypernetwork]",
        "---",
        "",
        "# QuARI model",
        "",
        "A query-adaptive retrieval hypernetwork (QuARI, arXiv 2505.21647) for a frozen "
        "embedding space. Load it with `quari.checkpoint.load(folder)`.",
        "",
        "| field | value |",
        "|---|---|",
        f"| encoder | {meta.get('encoder', 'unknown')} |",
        f"| embedding dim | {cfg.embedding_dim} |",
        f"| variant | {cfg.variant}: {form} |",
        f"| hidden dim / layers / heads / steps | {cfg.hidden_dim} / {cfg.num_layers} / "
        f"{cfg.num_heads} / {cfg.num_steps} |",
        f"| parameters | {n_params:,} |",
        f"| quari version | {__version__} |",
    ]
    for key in sorted(meta):
        if key in ("encoder", "metrics"):
            continue
        lines.append(f"| {key} | {meta[key]} |")
    metrics = meta.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"
