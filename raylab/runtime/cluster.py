"""Connecting to Ray: an existing cluster (``ray job submit``, RAY_ADDRESS) or a local one."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_ray_data() -> None:
    """Progress bars of Ray Data drown the driver's own output on small jobs."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    Inside a Ray job (``RAY_ADDRESS`` set, or ``address`` given) this joins that cluster.
    Otherwise it starts a local one bound to 127.0.0.1 with the dashboard off: nothing
    is exposed beyond this machine unless the user starts a cluster themselves.
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
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    quiet_ray_data()


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
