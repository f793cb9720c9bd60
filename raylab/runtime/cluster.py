"""Connecting to Ray: an existing cluster (``ray job submit``, RAY_ADDRESS) or a local one."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

import ray
import ray.data
from ray._private import worker as ray_worker

from raylab.errors import ResourceError


def quiet_ray_data() -> None:
    """Progress bars of Ray Data drown the driver's own output on small jobs."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


#: Ray's messages to the driver that tell a raylab user nothing they can act on; dropped
#: unless ``--verbose`` (each is matched as a substring of the log message).
RAY_NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "The given NumPy array is not writable",
    # raylet, when Ray Data's split coordinators and task workers start together
    "worker processes have been started on node",
    # Ray Data, each time a job starts after raylab turned its progress bars off
    "Progress bars disabled",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in RAY_NOISE)


def quiet_ray_noise() -> None:
    """Drop :data:`RAY_NOISE` from Ray's loggers and warnings in this process."""
    noise_filter = _DropNoise()
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(noise_filter)
        for handler in logger.handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(noise_filter)
    for noise in RAY_NOISE:
        warnings.filterwarnings("ignore", message=f".*{noise}")
    _filter_raylet_messages()


def _filter_raylet_messages() -> None:
    """Messages the raylet sends the driver are printed directly, not logged: drop the
    :data:`RAY_NOISE` among them (a wrapper around Ray's printer; left alone if this Ray
    has another layout)."""
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_raylab_filtered", False):
        return

    def filtered(data: dict, *args: object, **kwargs: object) -> None:
        lines = [line for line in data.get("lines", [])
                 if not any(noise in str(line) for noise in RAY_NOISE)]
        if lines:
            printer(dict(data, lines=lines), *args, **kwargs)

    filtered._raylab_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


#: Logical CPUs a local cluster gets beyond the machine's cores. Ray Data's read and
#: windowing tasks need a free CPU slot to run; without this, N workers on N cores hold
#: every slot and the input pipeline (and so training) waits forever.
DATA_HEADROOM_CPUS = 1


def local_cpus() -> int:
    return (os.cpu_count() or 1) + DATA_HEADROOM_CPUS


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               verbose: bool = False) -> None:
    """Start or join Ray once per process.

    Inside a Ray job (``RAY_ADDRESS`` set, or ``address`` given) this joins that cluster.
    Otherwise it starts a local one whose dashboard and job API listen on 127.0.0.1
    only, with Ray's token authentication left on. The local
    cluster has :data:`DATA_HEADROOM_CPUS` more logical CPUs than cores (see there).

    Ray's workers and actors log to their own files; only with ``verbose`` are those lines
    also copied to this process's output (Ray's default). raylab's own progress and its
    workers' warnings reach the console either way (:mod:`raylab.runtime.console`).
    """
    if not verbose:
        quiet_ray_noise()
    if ray.is_initialized():
        quiet_ray_data()
        return
    # Train V2 prints each worker line twice unless this is off.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    address = address or os.environ.get("RAY_ADDRESS")
    global _STARTED_LOCAL
    _STARTED_LOCAL = not address
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=logging.WARNING)
    else:
        # The local cluster's processes inherit this environment, so Ray Data logs with
        # this config in every task and actor. A job runtime_env carrying it would make
        # each worker start wait for Ray's runtime-env agent: 0.8-2 s more to the first
        # step on 2 cores (BENCHMARKS.md, "Platform overhead").
        os.environ.setdefault(
            "RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
        # Ray starts its workers at niceness 15 so that its daemons stay responsive on a
        # shared node. On a local cluster the training step then loses its share of the
        # cores to the driver, the daemons and the data tasks: a detection worker stepped
        # 30 % slower at 15 than at 0 on 2 cores (BENCHMARKS.md, "Detection on CPU").
        os.environ.setdefault("RAY_worker_niceness", "0")
        dashboard_port = _isolate_state_api()
        ray.init(
            # "local" starts a new cluster even when one started by `ray start` runs on
            # this machine (a bare ray.init() would join it, and then refuse num_cpus);
            # joining one is what RAY_ADDRESS / --address are for.
            address="local",
            num_cpus=num_cpus or local_cpus(),
            # The dashboard process also serves the State API, which Train needs to
            # release a Tune-stopped trial's placement group (without it, later trials
            # wait forever for CPUs). It listens on loopback only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=verbose,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    if not verbose:
        quiet_ray_noise()  # again: ray.init set up its handlers
    quiet_ray_data()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _isolate_state_api() -> int:
    """A dashboard port for a new local cluster, told to its processes up front.

    Ray Train's placement-group cleaner (an actor) finds the State API by looking for
    "the" Ray instance on this machine; with a second local cluster up (another raylab
    command, a notebook) it finds two, gives up, and a Tune-stopped trial's CPUs are never
    released: later trials wait forever. ``RAY_API_SERVER_ADDRESS`` names this cluster's
    dashboard instead; the cluster's processes inherit it from this one, so each local
    cluster only ever talks to itself.
    """
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return port


def cluster_resources() -> dict[str, float]:
    return dict(ray.cluster_resources())


#: Whether this process started its own local cluster (no autoscaler: what it has is all
#: it will ever have) rather than joining one.
_STARTED_LOCAL = False


def shortfall(workers: int, cpus_per_worker: float, gpus_per_worker: float,
              total: dict[str, float], nodes: list[dict[str, float]]) -> list[str]:
    """What a request of ``workers`` x (CPUs, GPUs) lacks on a cluster with ``total``
    resources and these alive ``nodes`` (each one's resources): a worker cannot span
    nodes. Empty when it fits."""
    short = []
    for kind, each in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        need, have = workers * each, total.get(kind, 0.0)
        if need > have:
            short.append(f"{need:g} {kind}s in all (the cluster has {have:g})")
    if not short and workers and not any(
            n.get("CPU", 0.0) >= cpus_per_worker and n.get("GPU", 0.0) >= gpus_per_worker
            for n in nodes):
        short.append(f"{cpus_per_worker:g} CPUs and {gpus_per_worker:g} GPUs on one node "
                     "for each worker (no node has that much)")
    return short


def check_request(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Refuse, before anything starts, a run the cluster can never hold: on a local
    cluster raylab started (no autoscaler) a ResourceError names what was asked and what
    exists; on a joined cluster it says once that the run waits for more nodes (an
    autoscaler may add them)."""
    if workers < 1:
        return
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    short = shortfall(workers, cpus_per_worker, gpus_per_worker, cluster_resources(), nodes)
    if not short:
        return
    asked = (f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g}"
             + (f" x --gpus-per-worker {gpus_per_worker:g}" if gpus_per_worker else ""))
    if _STARTED_LOCAL:
        raise ResourceError(f"{asked} needs {'; '.join(short)}: this local cluster cannot "
                            "grow; lower --workers or --cpus-per-worker, or join a larger "
                            "cluster with --address")
    print(f"raylab: {asked} needs {'; '.join(short)}; the run waits until the cluster's "
          "autoscaler adds nodes (Ctrl-C to stop)", flush=True)
