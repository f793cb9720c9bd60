"""Multi-task export: several runs that reuse one frozen backbone, stored and served with
the backbone once (Vasconcelos et al. 2022: one frozen backbone, many task heads).

:func:`export_multitask` takes the final models of several runs (``reuse`` classifiers on
the same backbone checkpoint, frozen detectors, or any convnext / minivit / detection run)
and writes one folder:

- ``shared.pt``: every tensor that two or more tasks hold bit for bit (the frozen
  backbone's weights and BatchNorm statistics), once, keyed by a hash of its content;
- ``tasks/<name>.pt``: each task's own tensors (head, adapters, anything that trained) and,
  for the rest, the keys of the shared tensors;
- ``bundle.json``: each task's ``meta.json`` (what rebuilds its network) and the sizes: each
  run's model alone, the bundle, and the bytes saved.

Tensors are matched by content, not by name, so a task whose blocks carry adapters
(``layer1.0.block.conv1.weight``) still shares its frozen weights with a task without
(``layer1.0.conv1.weight``). :func:`load_multitask` rebuilds every task's network
(:meth:`raylab.methods.base.Method.model_from_meta`) and loads the shared tensors into all
of them as the *same* tensors, so the backbone sits in memory once as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raylab.config import atomic_write_text
from raylab.engine.checkpoint import load_checkpoint, load_meta
from raylab.errors import CheckpointError, ConfigError

SHARED_FILE = "shared.pt"
BUNDLE_FILE = "bundle.json"
TASKS_DIR = "tasks"


def tensor_key(t: torch.Tensor) -> str:
    """A hash of a tensor's dtype, shape and bytes: equal keys, bit-identical tensors."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class TaskSource:
    """One task of the bundle: its name, its run's model folder, meta and weights."""

    name: str
    checkpoint: Path
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]


def _read_task(name: str, checkpoint: str | os.PathLike) -> TaskSource:
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"task name {name!r}: expected letters, digits, '-' or '_'")
    meta = load_meta(checkpoint)
    state = load_checkpoint(checkpoint).get("model")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{checkpoint}: holds no model weights")
    return TaskSource(name, Path(checkpoint), meta, state)


def export_multitask(tasks: dict[str, str | os.PathLike], out: str | os.PathLike
                     ) -> dict[str, Any]:
    """Write the bundle of ``tasks`` (name -> a run's ``model`` folder) to ``out``.

    Returns:
        ``bundle.json``'s content: per task its tensors, its model's bytes alone and the
        bytes it adds to the bundle; the shared bytes, the bundle's and the runs' models'
        bytes side by side (``saved_bytes``).

    Raises:
        ConfigError: Fewer than two tasks, a bad task name, or ``out`` exists and is not an
            empty folder.
        CheckpointError: A task folder that is not a raylab checkpoint with a model.
    """
    if len(tasks) < 2:
        raise ConfigError(f"a multi-task bundle needs two or more tasks, got {len(tasks)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; give a new folder")
    sources = [_read_task(name, path) for name, path in tasks.items()]
    holders: dict[str, set[str]] = {}
    for src in sources:
        for tensor in src.state.values():
            holders.setdefault(tensor_key(tensor), set()).add(src.name)
    shared_keys = {k for k, names in holders.items() if len(names) > 1}
    shared: dict[str, torch.Tensor] = {}
    files: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"tasks": {}}
    for src in sources:
        own, refs = {}, {}
        for name, tensor in src.state.items():
            key = tensor_key(tensor)
            if key in shared_keys:
                refs[name] = key
                shared.setdefault(key, tensor.detach().cpu().contiguous())
            else:
                own[name] = tensor.detach().cpu().contiguous()
        files[src.name] = {"own": own, "shared": refs}
        report["tasks"][src.name] = {
            "source": str(src.checkpoint.resolve()), "method": src.meta.get("method"),
            "tensors": len(src.state), "shared_tensors": len(refs),
            "alone_bytes": sum(_nbytes(t) for t in src.state.values()),
            "own_bytes": sum(_nbytes(t) for t in own.values()),
            "meta": src.meta}
    report["shared_tensors"] = len(shared)
    report["shared_bytes"] = sum(_nbytes(t) for t in shared.values())
    report["separate_bytes"] = sum(t["alone_bytes"] for t in report["tasks"].values())
    report["bundle_bytes"] = report["shared_bytes"] + sum(
        t["own_bytes"] for t in report["tasks"].values())
    report["saved_bytes"] = report["separate_bytes"] - report["bundle_bytes"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.save(shared, tmp / SHARED_FILE)
        (tmp / TASKS_DIR).mkdir()
        for name, content in files.items():
            torch.save(content, tmp / TASKS_DIR / f"{name}.pt")
        atomic_write_text(tmp / BUNDLE_FILE, json.dumps(report, indent=2, default=str))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def load_multitask(folder: str | os.PathLike, tasks: list[str] | None = None
                   ) -> dict[str, nn.Module]:
    """The bundle's task models (eval mode), each rebuilt from its meta; the shared
    tensors are loaded once and are the same tensors in every model.

    Raises:
        CheckpointError: Not a bundle, a task it lacks, or weights that do not fit.
    """
    from raylab.registry import get_method

    folder = Path(folder)
    try:
        report = json.loads((folder / BUNDLE_FILE).read_text())
        shared = torch.load(folder / SHARED_FILE, weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: not a raylab multi-task bundle ({exc})") from None
    names = tasks or list(report["tasks"])
    missing = sorted(set(names) - set(report["tasks"]))
    if missing:
        raise CheckpointError(f"{folder}: no task {missing[0]!r} in the bundle (it holds "
                              f"{sorted(report['tasks'])})")
    models = {}
    for name in names:
        meta = report["tasks"][name]["meta"]
        content = torch.load(folder / TASKS_DIR / f"{name}.pt", weights_only=True)
        state = dict(content["own"])
        state.update({k: shared[key] for k, key in content["shared"].items()})
        model = get_method(meta["method"]).model_from_meta(meta)
        try:
            # assign: the model's tensors become these very tensors (shared across tasks)
            model.load_state_dict(state, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: task {name!r}: weights do not fit its network "
                                  f"({str(exc).splitlines()[0]})") from None
        models[name] = model.eval()
    return models
