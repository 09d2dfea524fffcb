"""Model folders: save and load QuARI models, and import reference checkpoints.

A quari model folder holds three files::

    config.json         {"format": "quari-model", "format_version": 1, "quari_version": …,
                         "config": HyperNetConfig fields, "metadata": {encoder, data, metrics …}}
    model.safetensors   the state dict (no pickle)
    README.md           a model card generated from the two above

The reference implementation (mvrl/QuARI) ships ``config.yml`` (constructor arguments under
``hparams``) and ``weights.pt`` (a state dict); its released checkpoints on the Hugging Face hub
(``EricX003/QuARI-<backbone>``) name them ``model_hyperparams.yml`` and ``model_weights.pt``
(``{"state_dict": …}``, keys possibly prefixed ``hypernetwork.`` beside the backbone's).
:func:`load_reference` imports either into the ``"reference"`` variant; the weights are read
with ``torch.load(weights_only=True)`` so a malicious pickle cannot run code.

:func:`load_model` takes any of these by spec: a quari model folder, a reference folder, or
``hf:<repo-id>[@revision]`` (downloaded once through ``huggingface_hub``'s cache; with
``HF_HUB_OFFLINE=1`` only the cache is read).
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
from quari.adapters import LINEAR_FORMAT, LinearAdapter
from quari.errors import CheckpointError, NotFoundError, QuARIInputError, missing_extra
from quari.fileio import atomic_write, inside, read_json
from quari.hypernet import HyperNetConfig, QuARIModel

__all__ = [
    "CheckpointError", "load", "load_model", "load_reference", "save", "validation_verdict",
]  # fmt: skip

FORMAT = "quari-model"
FORMAT_VERSION = 1

# A reference checkpoint's two files: (config, weights) as in the fixture, then as released.
_REFERENCE_FILES = (("config.yml", "weights.pt"), ("model_hyperparams.yml", "model_weights.pt"))
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
    config_path, weights_path = (
        inside(folder, name, error=CheckpointError) for name in ("config.json", "model.safetensors")
    )
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
    """Imports a reference-implementation checkpoint.

    Args:
        folder: Folder holding ``config.yml`` (with ``hparams``) and ``weights.pt``, or the
            released layout ``model_hyperparams.yml`` and ``model_weights.pt``.

    Returns:
        A ``"reference"``-variant :class:`QuARIModel` in eval mode that reproduces the
        reference outputs (q′ and scores) to float32 rounding. ``metadata["backbone"]`` holds
        the checkpoint's ``feature_extractor`` entry when it names one.

    Raises:
        CheckpointError: missing files, unknown hyper-parameters, a file that is not a plain
            state dict, or missing/unexpected/misshapen weights.

    Example:
        >>> model = load_reference("tests/fixtures/official-small")  # doctest: +SKIP
    """
    folder = Path(folder)
    found = [
        (inside(folder, c, error=CheckpointError), inside(folder, w, error=CheckpointError))
        for c, w in _REFERENCE_FILES
        if (folder / c).is_file()
    ]
    config_path, weights_path = (
        found[0] if found else (folder / "config.yml", folder / "weights.pt")
    )
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; a reference checkpoint needs config.yml and weights.pt "
                "(or model_hyperparams.yml and model_weights.pt)"
            )
    try:
        meta = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
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
            f"{weights_path}: cannot be read as a plain state dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{weights_path}: expected a state dict of tensors")
    if any(k.startswith("hypernetwork.") for k in raw):
        # A whole training checkpoint: keep the hypernetwork's weights, drop the backbone's.
        raw = {
            k[len("hypernetwork.") :]: v for k, v in raw.items() if k.startswith("hypernetwork.")
        }
    state = {_rename_reference_key(k): v for k, v in raw.items()}
    model = _build(config, state, weights_path)
    model.metadata = {"source": "reference checkpoint", "imported_from": str(folder)}
    if meta.get("note"):
        model.metadata["note"] = meta["note"]
    if isinstance(meta.get("feature_extractor"), str):
        model.metadata["backbone"] = meta["feature_extractor"]
    return model


def load_model(
    spec: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> QuARIModel | LinearAdapter:
    """Loads a model from a quari model folder, a reference checkpoint or the hub.

    Args:
        spec: A folder (``config.json`` → :func:`load`, or
            :meth:`~quari.adapters.LinearAdapter.load` when its ``format`` is
            ``"quari-linear-adapter"``; ``config.yml`` or
            ``model_hyperparams.yml`` → :func:`load_reference`), or ``hf:<repo-id>`` /
            ``hf:<repo-id>@<revision>`` — a repository on the Hugging Face hub holding either
            layout (e.g. ``hf:EricX003/QuARI-google-siglip2-base-patch16-512``), fetched into
            ``huggingface_hub``'s cache once; ``HF_HUB_OFFLINE=1`` reads the cache only.
        map_location: Device for the weights.

    Returns:
        The model in eval mode: a :class:`QuARIModel`, or a
        :class:`~quari.adapters.LinearAdapter` for a linear-adapter folder.

    Raises:
        CheckpointError: a folder holding no model, a repository that cannot be fetched (or is
            not cached, offline), or any problem :func:`load` / :func:`load_reference` names.

    Example:
        >>> model = load_model("hf:EricX003/QuARI-clip-vit-base-patch16")  # doctest: +SKIP
    """
    text = os.fspath(spec)
    if text.startswith("hf:"):
        folder = _hub_folder(text[3:])
    else:
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise NotFoundError(f"{folder}: no such model folder")
    if (folder / "config.json").is_file():
        data = read_json(folder / "config.json", CheckpointError)
        if isinstance(data, dict) and data.get("format") == LINEAR_FORMAT:
            return LinearAdapter.load(folder, map_location=map_location)
        return load(folder, map_location=map_location)
    if any((folder / c).is_file() for c, _ in _REFERENCE_FILES):
        return load_reference(folder).to(map_location)
    raise CheckpointError(
        f"{spec}: neither a quari model folder (config.json + model.safetensors) nor a "
        "reference checkpoint (config.yml + weights.pt, or model_hyperparams.yml + "
        "model_weights.pt)"
    )


def _hub_folder(repo: str) -> Path:
    """A local snapshot of a hub model repository (downloaded once, then from the cache)."""
    repo_id, _, revision = repo.partition("@")
    if not repo_id or repo_id.count("/") != 1:
        raise QuARIInputError(f"hf:{repo}: expected hf:<owner>/<name>[@revision]")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError as exc:
        raise missing_extra("hf: model specs", "hf", exc) from exc
    patterns = ["*.json", "*.safetensors", "*.md", "*.yml", "*.yaml", "*.pt"]
    try:
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
    except HFValidationError as exc:
        raise QuARIInputError(f"hf:{repo}: {exc}") from None
    except Exception as exc:  # network errors, a missing repo, or not cached while offline
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the cache)" if offline else ""
        raise CheckpointError(
            f"hf:{repo}: cannot fetch the model{hint}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    return Path(path)


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
    """Creates the model for ``config`` and loads ``state`` strictly, with named mismatches.

    The shapes are checked on a skeleton on the ``meta`` device first, which allocates
    nothing: a config that does not fit its weights (``hidden_dim`` 65536 …) is refused before
    any memory is taken for it.
    """
    with torch.device("meta"):
        expected = QuARIModel(config).state_dict()
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
    model = QuARIModel(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def validation_verdict(metrics: dict[str, Any], metric: str = "mAP") -> str | None:
    """One sentence saying whether a trained model beat the frozen backbone on validation.

    Training records each validation metric twice, ``val/<name>`` for the model and
    ``baseline/<name>`` for plain cosine on the same queries and gallery, and ``gain_se/<name>``,
    the standard error of their per-query difference. A model that trained without error can
    still rank worse than cosine (too little or too generic data, a recipe that does not fit
    it); the model card and ``quari train`` say so in words instead of leaving it to a table,
    and say when the difference is within chance (its 95 % interval, ± 1.96 standard errors,
    holds 0).

    Args:
        metrics: Validation metrics as training records them.
        metric: The metric compared (the one that chose the exported checkpoint).

    Returns:
        The sentence, or None when either number is missing.

    Example:
        >>> print(validation_verdict({"val/mAP": 0.45, "baseline/mAP": 0.88})[:78])
        Below the frozen backbone: validation mAP 0.4500 against plain cosine's 0.8800
    """
    val, base = metrics.get(f"val/{metric}"), metrics.get(f"baseline/{metric}")
    if not isinstance(val, (int, float)) or not isinstance(base, (int, float)):
        return None
    numbers = f"validation {metric} {val:.4f} against plain cosine's {base:.4f}"
    notes = [f"{100 * (val - base) / base:+.1f} %"] if base > 0 else []
    se = metrics.get(f"gain_se/{metric}")
    if isinstance(se, (int, float)) and val != base:
        low, high = val - base - 1.96 * se, val - base + 1.96 * se
        span = f"95 % interval of the difference {low:+.4f} to {high:+.4f}"
        notes.append(span if low > 0 or high < 0 else f"within chance: {span}")
    if notes:
        numbers += f" ({'; '.join(notes)})"
    if val > base:
        return f"Above the frozen backbone: {numbers}."
    if val == base:
        return f"Level with the frozen backbone: {numbers}."
    return (
        f"Below the frozen backbone: {numbers}; searching the embeddings with plain cosine "
        "ranks better on this validation set."
    )


def _model_card(model: QuARIModel) -> str:
    cfg, meta = model.config, model.metadata
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.variant == "paper":
        form = f"T = U Vᵀ (rank {cfg.rank})"
    elif cfg.normalize_factors:
        form = f"T = I + {cfg.anchor_scale:.3g}·Û V̂ᵀ (rank {cfg.rank}, Frobenius-normalised)"
    else:
        form = f"T = I + {cfg.anchor_scale:.3g}·U Vᵀ (rank {cfg.rank})"
    start = {"identity": "the frozen backbone (q′ = q, T = I)", "default": "random"}
    if cfg.map_query:
        query = "q′ = normalize(T q): the query mapped like the items"
    else:
        lam = cfg.query_residual_weight
        query = f"q′ = normalize({1 - lam:g}·MLP(ctx) + {lam:g}·q)" if lam else "q′ = MLP(ctx)"
    blend = meta.get("blend") if isinstance(meta.get("blend"), dict) else {}
    score = "cos(q′, T d)"
    if cfg.blend_weight:
        a = cfg.blend_weight
        score = f"{1 - a:g}·cos(q′, T d) + {a:g}·cos(W q, W d), W a whitening"
        score += f" ({blend['whitening']})" if "whitening" in blend else ""
    elif blend:
        score += f"; static blend not attached ({blend.get('attached', 'no')})"
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
        f"| adapted query | {query} |",
        f"| score | {score} |",
        f"| initialisation | {start.get(cfg.init, cfg.init)} |",
        f"| hidden dim / layers / heads / steps | {cfg.hidden_dim} / {cfg.num_layers} / "
        f"{cfg.num_heads} / {cfg.num_steps} |",
        f"| decoder LayerNorm | {'yes' if cfg.decoder_norm else 'no'} |",
        f"| parameters | {n_params:,} |",
        f"| quari version | {__version__} |",
    ]
    for key in sorted(meta):
        if key in ("encoder", "metrics", "blend"):
            continue
        lines.append(f"| {key} | {meta[key]} |")
    metrics = meta.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines += ["", "## Validation", ""]
        if "checkpoint" in meta:
            lines += [f"Exported checkpoint: {meta['checkpoint']}.", ""]
        verdict = validation_verdict(metrics)
        if verdict:
            lines += [f"**{verdict}**", ""]
        without = blend.get("metrics_without_blend") or {}
        if cfg.blend_weight and "val/mAP" in without:
            lines += [f"Without the static blend: val/mAP {without['val/mAP']}.", ""]
        paired = sorted(k[4:] for k in metrics if k.startswith("val/"))
        if paired:
            lines += [
                "| metric | this model | frozen backbone (cosine) | difference ± 95 % |",
                "|---|---|---|---|",
            ]
            for name in paired:
                val, base = metrics[f"val/{name}"], metrics.get(f"baseline/{name}")
                se = metrics.get(f"gain_se/{name}")
                diff = "—" if base is None else f"{val - base:+.4f}"
                if base is not None and se is not None:
                    diff += f" ± {1.96 * se:.4f}"
                lines.append(f"| {name} | {val} | {'—' if base is None else base} | {diff} |")
        others = sorted(k for k in metrics if not k.startswith(("val/", "baseline/", "gain_se/")))
        if others:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {metrics[k]} |" for k in others]
    return "\n".join(lines) + "\n"
