"""Explicit checkpoint save/restore: model, optimizer, scheduler, scaler, EMA, RNG, epoch.

A checkpoint is a folder holding ``state.pt`` (tensors and plain containers only, so it
loads with ``torch.load(weights_only=True)``) and ``meta.json`` (method name, resolved
config, normalisation statistics, class names: everything needed to use the model
without the training data). Both are written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylab.config import atomic_write_text
from raylab.errors import CheckpointError, StorageError

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel, DataParallel or ``torch.compile``.

    Any other module whose only child is ``module`` and that owns no parameters or buffers
    of its own also counts as a wrapper, and so does a plain object holding a ``module``
    (:class:`raylab.optim.ModelEma`).
    """
    if not isinstance(model, torch.nn.Module) and isinstance(
            getattr(model, "module", None), torch.nn.Module):
        model = model.module
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        is_wrapper = isinstance(
            model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
        ) or (
            [name for name, _ in model.named_children()] == ["module"]
            and next(model.parameters(recurse=False), None) is None
            and next(model.buffers(recurse=False), None) is None
        )
        if not is_wrapper:
            return model
        model = inner


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as weights_only-loadable containers."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    ema: torch.nn.Module | None = None,
    epoch: int = 0,
    step: int = 0,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete training state to ``directory`` (created if needed).

    ``extra`` holds further method state made of tensors and plain values (DINO's center
    and schedules, ...); it comes back as ``state["extra"]``.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{directory}: cannot write checkpoint "
                           f"({exc.strerror or exc})") from None
    state: dict[str, Any] = {
        "model": unwrap_model(model).state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng_state(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if ema is not None:
        state["ema"] = unwrap_model(ema).state_dict()
    if extra:
        state["extra"] = extra
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=directory)
        os.close(fd)
        torch.save(state, tmp)
        os.replace(tmp, directory / STATE_FILE)
        atomic_write_text(directory / META_FILE,
                          json.dumps(meta or {}, indent=2, sort_keys=True))
    except OSError as exc:  # disk full, storage gone read-only, ...
        raise StorageError(f"{directory}: cannot write checkpoint "
                           f"({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return directory


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint folder."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a raylab checkpoint (no {META_FILE})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({exc})") from None


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Load ``state.pt`` safely (``weights_only=True``) and check its structure.

    Raises:
        CheckpointError: naming the file, when it is missing, truncated, corrupt, holds
            a type ``weights_only`` refuses, or is not a training state written by
            :func:`save_checkpoint` (no model weights, an epoch that is not a count, ...).
            Never a raw torch, zip or pickle exception.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a raylab checkpoint (no {STATE_FILE})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle refusing a type, EOFError, ...
        raise CheckpointError(f"{path}: corrupt or unsafe checkpoint ({_load_failure(path, exc)})"
                              ) from None
    validate_state(state, str(path))
    return state


def _load_failure(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed, in words (torch says "Invalid argument" for a cut file)."""
    try:
        size = path.stat().st_size
        is_zip = zipfile.is_zipfile(path)
    except OSError:
        return short_reason(exc)
    if size == 0:
        return "empty file"
    refused = re.search(r"WeightsUnpickler error: ([^\n]+)", str(exc))
    if is_zip and refused:
        return f"refused by weights_only loading: {refused.group(1).strip()[:160]}"
    if not is_zip:  # torch.save writes a zip archive; its directory is at the end
        return f"truncated or not a PyTorch file, {size} bytes"
    return short_reason(exc)


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message (torch's weights_only one spans many)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_weights(weights: Any, key: str) -> str | None:
    """Why ``weights`` is not a module state dict (None when it is one)."""
    if not isinstance(weights, dict):
        return f"'{key}' holds a {type(weights).__name__}, expected a dict of tensors"
    for name, value in weights.items():
        if not isinstance(name, str):
            return f"'{key}' has a non-text key {name!r}"
        if not isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
            return f"'{key}' entry {name!r} holds a {type(value).__name__}, expected a tensor"
    return None


def validate_state(state: Any, where: str) -> None:
    """Check that ``state`` looks like what :func:`save_checkpoint` writes.

    ``torch.load`` happily returns any container of tensors; this stops a checkpoint of
    another program (or a damaged one that still unpickles) from being half-applied.

    Raises:
        CheckpointError: ``where: not a raylab training state (...)``.
    """
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{where}: not a raylab training state ({reason})")

    if not isinstance(state, dict):
        raise bad(f"holds a {type(state).__name__}, expected a dict")
    if "model" not in state:
        raise bad("no 'model' weights")
    for key in ("model", "ema"):
        if key in state:
            problem = _check_weights(state[key], key)
            if problem:
                raise bad(problem)
    for key in ("epoch", "step"):
        if key in state and not _is_count(state[key]):
            raise bad(f"'{key}' is {state[key]!r}, expected an integer >= 0")
    for key in ("optimizer", "scheduler", "scaler", "extra", "rng"):
        if key in state and not isinstance(state[key], dict):
            raise bad(f"'{key}' holds a {type(state[key]).__name__}, expected a dict")
    optimizer = state.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer.get("state"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)):
        raise bad("'optimizer' lacks its 'state' or 'param_groups'")
    rng = state.get("rng")
    if rng is not None:
        torch_rng = rng.get("torch")
        py_rng = rng.get("python")
        if not (isinstance(torch_rng, torch.Tensor) and torch_rng.dtype == torch.uint8
                and isinstance(py_rng, (tuple, list)) and len(py_rng) == 3
                and isinstance(rng.get("numpy"), dict)):
            raise bad("'rng' is not the random generator state raylab saves")


def _weights_mismatch(saved: dict[str, Any], module: torch.nn.Module, key: str
                      ) -> str | None:
    """How a saved state dict differs from ``module``'s (None when it fits)."""
    expected = unwrap_model(module).state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    shapes = [
        f"{k} {list(saved[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in saved and isinstance(v, torch.Tensor) and isinstance(saved[k], torch.Tensor)
        and saved[k].shape != v.shape
    ]
    if shapes:
        problems.append("shape (checkpoint vs model) of " + _few(shapes))
    return f"'{key}' does not fit: " + "; ".join(problems) if problems else None


def _few(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _optimizer_mismatch(saved: dict[str, Any], optimizer: torch.optim.Optimizer
                        ) -> str | None:
    """How a saved optimizer state differs from ``optimizer`` (None when it fits)."""
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        return (f"'optimizer' has {len(groups)} parameter group(s), the optimizer "
                f"{len(optimizer.param_groups)}")
    for i, (old, new) in enumerate(zip(groups, optimizer.param_groups)):
        ids = old.get("params") if isinstance(old, dict) else None
        if not isinstance(ids, list) or len(ids) != len(new["params"]):
            return f"'optimizer' group {i} holds another number of parameters"
        for pid, param in zip(ids, new["params"]):
            per_param = saved["state"].get(pid, {})
            if not isinstance(per_param, dict):
                return f"'optimizer' state of parameter {pid} is not a dict"
            for name, value in per_param.items():
                if (isinstance(value, torch.Tensor) and value.dim() > 0
                        and value.shape != param.shape):
                    return (f"'optimizer' {name} of parameter {pid} has shape "
                            f"{list(value.shape)}, the parameter {list(param.shape)}")
    return None


def check_compatible(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: torch.nn.Module | None = None,
    where: str = "checkpoint",
    **_: Any,
) -> None:
    """Check, without changing anything, that ``state`` can be loaded into the objects.

    Keys and shapes of the model (and EMA) weights and the optimizer's parameter groups
    must match; dtypes may differ (``load_state_dict`` casts).

    Raises:
        CheckpointError: ``where: does not fit ...`` naming the first differences.
    """
    validate_state(state, where)
    problems = [_weights_mismatch(state["model"], model, "model")]
    if ema is not None and "ema" in state:
        problems.append(_weights_mismatch(state["ema"], ema, "ema"))
    if optimizer is not None and "optimizer" in state:
        problems.append(_optimizer_mismatch(state["optimizer"], optimizer))
    found = [p for p in problems if p]
    if found:
        raise CheckpointError(f"{where}: checkpoint does not fit this run ({'; '.join(found)})")


def restore_checkpoint(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    ema: torch.nn.Module | None = None,
    restore_rng: bool = True,
    where: str = "checkpoint",
) -> tuple[int, int]:
    """Load ``state`` into the given objects; returns ``(epoch, step)`` saved with it.

    Everything is checked first (:func:`check_compatible`), so a checkpoint that does not
    fit raises before any object changes.

    Raises:
        CheckpointError: ``state`` is not a training state or does not fit the objects.
    """
    check_compatible(state, model=model, optimizer=optimizer, ema=ema, where=where)
    try:
        unwrap_model(model).load_state_dict(state["model"])
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            unwrap_model(ema).load_state_dict(state["ema"])
        if restore_rng and "rng" in state:
            set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{where}: checkpoint could not be restored "
                              f"({short_reason(exc)})") from None
    return int(state.get("epoch", 0)), int(state.get("step", 0))
