"""Stateful services as Ray actors, and a plain interface to them for worker code.

The CLEAR stream (:class:`~raylab.continual.stream.StreamService`) runs as a named,
restartable actor; workers reach it through :class:`ActorProxy`, which turns each method
call into a blocking ``ray.get``, so the learner's code is the same for the actor and for a
local service object (tests, benchmarks).
"""

from __future__ import annotations

import os
from typing import Any

import ray

from raylab.continual.stream import StreamService

#: The namespace of raylab's named actors.
NAMESPACE = "raylab"


def start_stream(name: str, state_path: str | os.PathLike, *, namespace: str = NAMESPACE,
                 num_cpus: float = 0, **protocol_kwargs: Any) -> Any:
    """Start (or get, if already running) the named stream actor; returns its handle.

    The actor restarts without limit (``max_restarts=-1``) and retries calls that a crash
    interrupted (``max_task_retries=-1``); a restart resumes from ``state_path``. It lives
    as long as the driver that started it (``lifetime=None``); a new driver resumes from
    the same file. Needs ``ray.init`` first; workers find it with :func:`get_actor`.
    """
    actor = ray.remote(max_restarts=-1, max_task_retries=-1)(StreamService)
    return actor.options(name=name, namespace=namespace, get_if_exists=True, lifetime=None,
                         num_cpus=num_cpus).remote(os.fspath(state_path), **protocol_kwargs)


def get_actor(name: str, namespace: str = NAMESPACE) -> Any:
    """The handle of the running actor ``name`` (e.g. from a TorchTrainer worker)."""
    return ray.get_actor(name, namespace=namespace)


class ActorProxy:
    """An actor behind a plain interface: ``proxy.method(*args)`` is
    ``ray.get(handle.method.remote(*args), timeout=timeout_s)``.

    ``timeout_s`` bounds each call: a restarting actor answers after its restart, a lost
    one raises instead of hanging the workers.
    """

    def __init__(self, handle: Any, timeout_s: float = 600.0) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    @property
    def handle(self) -> Any:
        return self._handle

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        remote = getattr(self._handle, method)

        def call(*args: Any, **kwargs: Any) -> Any:
            return ray.get(remote.remote(*args, **kwargs), timeout=self._timeout_s)

        return call

    def kill(self) -> None:
        ray.kill(self._handle, no_restart=True)
