"""Input checks shared by the model, the scoring code and the stores.

Every public entry point that takes embeddings runs them through :func:`as_embeddings`, so a
wrong dimension, a NaN or an empty batch fails the same way everywhere: with a
:class:`QuARIInputError` whose message names the argument, what was expected and what came in.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np
import torch

from quari.errors import NotFoundError, QuARIInputError

__all__ = [
    "QuARIInputError",
    "as_embeddings",
    "check_device",
    "check_fields",
    "check_k",
    "load_array_file",
    "nonfinite_rows",
    "unit_rows",
]


def check_fields(cls: type, keys: Any, what: str, exclude: tuple[str, ...] = ()) -> None:
    """Refuses keys that are not fields of the dataclass ``cls``, naming them and the known
    ones (configs read from files and spec options go through this before ``cls(**keys)``).

    Args:
        cls: A dataclass.
        keys: The names given.
        what: How the message names them, e.g. ``"HyperNetConfig field"``.
        exclude: Fields that may not be given this way.

    Raises:
        QuARIInputError: ``unknown {what}(s) [...]; known: [...]``.
    """
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = sorted(set(keys) - known)
    if unknown:
        raise QuARIInputError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """Turns a numpy array (memmaps included) or a tensor into a tensor without copying data.

    Args:
        x: A ``torch.Tensor`` or anything ``np.asarray`` accepts.
        name: The argument's name, used in error messages.

    Returns:
        A tensor sharing memory with ``x`` where possible.
    """
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise QuARIInputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if not arr.flags.writeable:
        # torch warns on read-only buffers (memmaps opened "r"); nothing here writes through them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(np.ascontiguousarray(arr))


def as_embeddings(
    x: Any,
    dim: int,
    name: str,
    *,
    ndim: int | tuple[int, ...] = 2,
    normalize: bool = False,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str | None = None,
    allow_empty: bool = False,
    check_finite: bool = True,
) -> torch.Tensor:
    """Validates a batch of embeddings and returns it as a floating tensor.

    Args:
        x: Array or tensor whose last axis holds the embedding.
        dim: Required size of the last axis.
        name: Argument name for error messages (e.g. ``"queries"``).
        ndim: Allowed number of axes (an int or a tuple of ints).
        normalize: L2-normalise along the last axis (:func:`unit_rows`: scaled first, so
            huge and tiny rows normalise exactly); an all-zero row has no direction and is
            refused.
        dtype: Floating dtype to convert to, or ``None`` to keep a floating input's dtype.
        device: Device to move to (``None`` keeps the input's device).
        allow_empty: Accept a leading axis of length zero.
        check_finite: Look for NaN/Inf values (a device synchronisation on GPU). ``False``
            is for callers that check finiteness themselves later (the CUDA-graph path).

    Returns:
        The checked tensor.

    Raises:
        QuARIInputError: on a wrong number of axes, a wrong last-axis size, an empty batch,
            a non-floating dtype, any NaN/Inf value, or (with ``normalize``) an all-zero row —
            the message names the first bad row.

    Example:
        >>> q = as_embeddings(np.ones((2, 4)), 4, "queries", normalize=True)
        >>> q.norm(dim=-1)
        tensor([1., 1.])
    """
    t = as_tensor(x, name)
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.ndim not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed)
        raise QuARIInputError(
            f"{name}: expected a {want} array with last axis {dim}, got shape {tuple(t.shape)}"
        )
    if t.shape[-1] != dim:
        raise QuARIInputError(
            f"{name}: expected embedding dimension {dim}, got {t.shape[-1]} "
            f"(shape {tuple(t.shape)})"
        )
    if t.shape[0] == 0 and not allow_empty:
        raise QuARIInputError(
            f"{name}: empty batch (shape {tuple(t.shape)}); pass at least one row"
        )
    if not t.is_floating_point():
        if dtype is None:
            raise QuARIInputError(f"{name}: expected a floating dtype, got {t.dtype}")
        t = t.to(dtype)
    if device is not None or dtype is not None:
        t = t.to(device=device, dtype=dtype if dtype is not None else t.dtype)
    bad = nonfinite_rows(t.reshape(-1, dim)) if check_finite else t.new_empty(0)
    if bad.numel():
        first = int(bad[0])
        where = np.unravel_index(first, tuple(t.shape[:-1]))
        where_s = ", ".join(str(int(i)) for i in where)
        raise QuARIInputError(
            f"{name}: row [{where_s}] contains NaN or Inf ({bad.numel()} bad row(s) in all)"
        )
    if normalize:
        zero = torch.nonzero(~t.reshape(-1, dim).any(dim=-1)).flatten()
        if zero.numel():
            where = np.unravel_index(int(zero[0]), tuple(t.shape[:-1]))
            where_s = ", ".join(str(int(i)) for i in where)
            raise QuARIInputError(
                f"{name}: row [{where_s}] is all zeros and has no direction to search along "
                f"({zero.numel()} zero row(s) in all)"
            )
        t = unit_rows(t)
    return t


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, exact for any finite scale.

    Each row is first divided by its largest magnitude, so its squared norm can neither
    overflow (rows of 1e20) nor underflow (rows of 1e-30) in fp32 — where plain
    normalisation would turn such a row into zeros. All-zero rows stay zero.

    Example:
        >>> unit_rows(torch.tensor([[3e20, 4e20], [3e-30, 4e-30]]))
        tensor([[0.6000, 0.8000],
                [0.6000, 0.8000]])
    """
    peak = t.abs().amax(dim=-1, keepdim=True)
    scaled = t / torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.nn.functional.normalize(scaled, dim=-1)


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of a 2-D tensor that hold any NaN or Inf.

    A row sum is non-finite whenever the row holds a NaN or Inf, and one vectorised sum is several
    times cheaper than ``isfinite`` over fp16 data; rows whose sum merely overflowed are weeded
    out by the exact check on the few suspects.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    suspects = torch.nonzero(~torch.isfinite(x.sum(dim=-1, dtype=acc))).flatten()
    if suspects.numel() == 0:
        return suspects
    return suspects[~torch.isfinite(x[suspects]).all(dim=-1)]


def check_k(k: Any, name: str = "k") -> int:
    """Validates a count (``k``, ``candidates`` …) and returns it as an int.

    Args:
        k: The value.
        name: The argument's name, for the message.

    Raises:
        QuARIInputError: if ``k`` is not a positive integer.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise QuARIInputError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``.

    Returns:
        The device.

    Raises:
        QuARIInputError: not a device name, or a device this machine does not have.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise QuARIInputError(
            f"device {device!r}: not a device name (use cpu, cuda, cuda:<n> or mps)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QuARIInputError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QuARIInputError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise QuARIInputError(f"device {device!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise QuARIInputError(f"device {device!r}: quari runs on cpu, cuda or mps")
    return dev


def load_array_file(path: str | os.PathLike[str], name: str = "queries") -> np.ndarray:
    """Reads a numeric ``.npy`` array (never unpickling anything).

    Args:
        path: The file.
        name: What it holds, for messages.

    Returns:
        The array (a 1-D array becomes one row).

    Raises:
        NotFoundError: no such file.
        QuARIInputError: not a numeric .npy array (pickled objects, garbage, an .npz).
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QuARIInputError(f"{path}: a folder, not a .npy file of {name}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise QuARIInputError(
            f"{path}: not a numeric .npy array of {name} ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise QuARIInputError(f"{path}: an .npz archive; save one array with np.save")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise QuARIInputError(f"{path}: {name} must be numbers, got dtype {arr.dtype}")
    return arr[None] if arr.ndim == 1 else arr
