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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylab.config import atomic_write_text
from raylab.errors import CheckpointError

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
    directory.mkdir(parents=True, exist_ok=True)
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
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=directory)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / STATE_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_text(directory / META_FILE, json.dumps(meta or {}, indent=2, sort_keys=True))
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
    """Load ``state.pt`` safely (``weights_only=True``); CheckpointError if unreadable."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a raylab checkpoint (no {STATE_FILE})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle refusing a type, ...
        # One line: torch's weights_only message spans many, and the CLI shows one.
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path}: corrupt or unsafe checkpoint ({detail})") from None


def restore_checkpoint(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    ema: torch.nn.Module | None = None,
    restore_rng: bool = True,
) -> tuple[int, int]:
    """Load ``state`` into the given objects; returns ``(epoch, step)`` saved with it."""
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
    return int(state.get("epoch", 0)), int(state.get("step", 0))
