"""Connecting to Ray: an existing cluster (``ray job submit``, RAY_ADDRESS) or a local one."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path


def quiet_ray_data() -> None:
    """Progress bars of Ray Data drown the driver's own output on small jobs."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


#: Logical CPUs a local cluster gets beyond the machine's cores. Ray Data's read and
#: windowing tasks need a free CPU slot to run; without this, N workers on N cores hold
#: every slot and the input pipeline (and so training) waits forever.
DATA_HEADROOM_CPUS = 1


def local_cpus() -> int:
    return (os.cpu_count() or 1) + DATA_HEADROOM_CPUS


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    Inside a Ray job (``RAY_ADDRESS`` set, or ``address`` given) this joins that cluster.
    Otherwise it starts a local one whose dashboard and job API listen on 127.0.0.1
    only, with Ray's token authentication left on. The local
    cluster has :data:`DATA_HEADROOM_CPUS` more logical CPUs than cores (see there).
    """
    import ray

    if ray.is_initialized():
        quiet_ray_data()
        return
    # Train V2 prints each worker line twice unless this is off.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # The local cluster's processes inherit this environment, so Ray Data logs with
        # this config in every task and actor. A job runtime_env carrying it would make
        # each worker start wait for Ray's runtime-env agent: 0.8-2 s more to the first
        # step on 2 cores (BENCHMARKS.md, "Platform overhead").
        os.environ.setdefault(
            "RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
        ray.init(
            num_cpus=num_cpus or local_cpus(),
            # The dashboard process also serves the State API, which Train needs to
            # release a Tune-stopped trial's placement group (without it, later trials
            # wait forever for CPUs). It listens on loopback only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    quiet_ray_data()


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
