"""Where the engine's loop runs: one of N data-parallel workers (pure torch).

The loop (:mod:`raylab.engine.loop`) and the methods' tasks talk to a
:class:`WorkerContext` only: rank and device, the model wrapper, all-reduce, this worker's
dataset shards, the checkpoints to resume from, and where reports go. The runtime's
``RayContext`` (``raylab.runtime.worker``) fills these in from Ray Train;
:class:`LocalContext` fills them in from plain objects (tests, benchmarks, scripts), also
across processes of a ``torch.distributed`` group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raylab.engine.progress import NullProgress, Progress
from raylab.engine.restore import Candidates, CheckpointFolder, checkpoint_name, export_folder
from raylab.engine.shards import Shard


def distributed() -> bool:
    """True inside a ``torch.distributed`` group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class WorkerContext:
    """One data-parallel worker: what the engine needs from wherever it runs.

    Subclasses provide :meth:`shard`, :meth:`checkpoint_candidates` and :meth:`report`;
    the collective operations work for any ``torch.distributed`` group (gloo on CPU, NCCL
    on GPU) and are copies when the worker is alone.
    """

    def __init__(self, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", progress: Progress | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.progress: Progress = progress or NullProgress()
        self.dataset_names: dict[str, str] = {}

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this worker's device; wrap it in DDP when there are several
        workers (gradients are then averaged over workers in ``backward``)."""
        model = model.to(self.device)
        if not distributed():
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced (``sum``, ``max`` or ``min``) over workers, as a new tensor
        on its own device; a copy when alone.

        NCCL reduces only CUDA tensors, so CPU tensors (metric counters) take a round trip
        through this worker's GPU there; with gloo the tensor is reduced where it is.
        """
        out = tensor.clone()
        if not distributed():
            return out
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}[op]
        if dist.get_backend() == "nccl" and out.device.type != "cuda":
            on_gpu = out.to(self.device)
            dist.all_reduce(on_gpu, op=reduce_op)
            return on_gpu.to(tensor.device)
        dist.all_reduce(out, op=reduce_op)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(tensor, "sum")

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` over all workers."""
        return int(self.all_reduce(torch.tensor([value], dtype=torch.int64), "max").item())

    def any_worker(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any worker (a collective: every worker calls it)."""
        return bool(self.all_reduce(torch.tensor([float(flag)]), "max").item())

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every worker's ``obj`` (picklable), in rank order, on every worker; ``[obj]``
        when alone. For results that do not sum, e.g. detections that one worker scores
        with COCOeval."""
        if not distributed():
            return [obj]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Worker ``src``'s ``obj`` on every worker (the others pass anything, e.g. None)."""
        if not distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        """Wait until every worker got here (a collective, so it also orders their steps)."""
        if distributed():
            self.all_reduce(torch.zeros(1))

    def use_datasets(self, names: Mapping[str, str]) -> None:
        """Map the dataset names a task asks for to the run's (e.g. ``train`` ->
        ``supertrial1.train``, when one Train run trains several runs)."""
        self.dataset_names = dict(names)

    def dataset_name(self, name: str) -> str:
        return self.dataset_names.get(name, name)

    # ------------------------------------------------------------------ to subclass

    def shard(self, name: str) -> Shard:
        """This worker's shard of dataset ``name`` (after :meth:`dataset_name`)."""
        raise NotImplementedError

    def checkpoint_candidates(self) -> Candidates:
        """The run's checkpoints to resume from, newest first."""
        return []

    def service(self, name: str) -> Any:
        """The named service of the run (e.g. CLEAR's stream) behind a plain interface:
        its methods are called like a local object's."""
        raise KeyError(f"this worker has no service {name!r}")

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> None:
        """Report ``metrics`` from every worker; the chief also saves ``checkpoint`` (the
        keyword arguments of :func:`~raylab.engine.checkpoint.save_checkpoint`) in a folder
        named for the run (``metrics["run"]``, see :func:`checkpoint_name`)."""
        raise NotImplementedError

    def export_model(self, run: str, checkpoint: dict[str, Any]) -> str | None:
        """The chief writes run ``run``'s final state where users find it
        (``<experiment>/<run>/model``); returns that path (None elsewhere, or when the
        context keeps no files)."""
        return None


class LocalContext(WorkerContext):
    """A worker without Ray: shards handed in, checkpoints in a local folder, reports kept
    in :attr:`reports`.

    In a ``torch.distributed`` group (e.g. processes started by a test), rank and world
    size come from the group, and only rank 0 writes checkpoints.

    Args:
        shards: Dataset name -> this worker's shard.
        run_dir: Checkpoints are written here and resumed from (None: no checkpoints);
            final models are exported to ``run_dir/<run>/model``.
        keep: Checkpoints kept in ``run_dir``.
        services: Service name -> the object itself (e.g. a ``StreamService``).
    """

    def __init__(self, shards: Mapping[str, Shard] | None = None,
                 run_dir: str | os.PathLike | None = None, keep: int = 2,
                 device: torch.device | str = "cpu", progress: Progress | None = None,
                 services: Mapping[str, Any] | None = None) -> None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
        super().__init__(rank, world, device, progress)
        self.shards = dict(shards or {})
        self.services = dict(services or {})
        self.folder = CheckpointFolder(run_dir, keep) if run_dir is not None else None
        self.reports: list[dict[str, Any]] = []
        self.saved: list[str] = []

    def shard(self, name: str) -> Shard:
        try:
            return self.shards[self.dataset_name(name)]
        except KeyError:
            raise KeyError(f"no dataset {self.dataset_name(name)!r}; this context has "
                           f"{sorted(self.shards)}") from None

    def checkpoint_candidates(self) -> Candidates:
        return self.folder.candidates() if self.folder is not None else []

    def service(self, name: str) -> Any:
        try:
            return self.services[name]
        except KeyError:
            raise KeyError(f"no service {name!r}; this context has {sorted(self.services)}"
                           ) from None

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> None:
        if checkpoint is not None and self.folder is not None and self.is_chief:
            name = checkpoint_name(str(metrics.get("run") or ""))
            self.saved.append(str(self.folder.save(name, **checkpoint)))
        self.barrier()  # as Ray Train's report: no worker runs ahead of a checkpoint
        self.reports.append(dict(metrics))

    def export_model(self, run: str, checkpoint: dict[str, Any]) -> str | None:
        if self.folder is None or not self.is_chief:
            return None
        return str(export_folder(self.folder.run_dir / (run or "run") / "model", **checkpoint))
