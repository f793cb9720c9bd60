"""Run a function in N processes of a ``torch.distributed`` group (gloo on loopback).

What the engine's data-parallel tests use instead of Ray: the same task code on the same
loop, with :class:`raylab.engine.context.LocalContext` reading rank and world size from the
group. A process that fails fails the whole call (with its traceback), never a hang.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple,
               results: Any) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        try:
            # As bytes: a tensor put in the queue as such would be shared through a file
            # descriptor that dies with this process.
            buffer = io.BytesIO()
            torch.save(fn(*args), buffer)
            results.put((rank, "ok", buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 240.0
              ) -> list[Any]:
    """``[fn(*args) on rank 0, ..., on rank world-1]``, each rank its own process.

    ``fn`` must be importable by name (a module-level function) and its result picklable.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, results))
             for r in range(world)]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    try:
        while len(out) < world:
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"rank(s) {sorted(set(range(world)) - set(out))} gave "
                                   f"no result within {timeout_s} s") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    return [out[r] for r in range(world)]
