"""The training engine: one epoch loop and the plain-torch tools around it (no Ray).

- :mod:`.loop`: :class:`~raylab.engine.loop.Task` (a method's hooks) and
  :func:`~raylab.engine.loop.run` (the epoch loop every method runs).
- :mod:`.context`: :class:`~raylab.engine.context.WorkerContext`, what the loop needs from
  where it runs (rank, device, DDP, all-reduce, shards, checkpoints, reports);
  :class:`~raylab.engine.context.LocalContext` without Ray. ``raylab.runtime.worker``
  provides the Ray Train one.
- :mod:`.batching`: the split of the global batch over workers, the shuffle seeds.
- :mod:`.shards`: a worker's batches per epoch (with :mod:`.batch_cache`).
- :mod:`.checkpoint`, :mod:`.restore`: saving, checking and resuming training state.
- :mod:`.precision`, :mod:`.schedules`: autocast contexts, per-iteration schedules.
- :mod:`.progress`: the epoch lines and in-epoch bar a person sees.
"""
