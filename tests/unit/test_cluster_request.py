"""A run that can never fit the cluster is refused before anything starts: what a request
of workers x (CPUs, GPUs) lacks, worked out by hand (no Ray started)."""

from __future__ import annotations

from raylab.runtime.cluster import shortfall

TWO_NODES = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0}]
TOTAL = {"CPU": 6.0, "GPU": 1.0}


def test_a_request_that_fits_lacks_nothing() -> None:
    assert shortfall(3, 2.0, 0.0, TOTAL, TWO_NODES) == []
    assert shortfall(1, 4.0, 1.0, TOTAL, TWO_NODES) == []
    assert shortfall(0, 99.0, 9.0, TOTAL, TWO_NODES) == []  # in-process: nothing asked


def test_totals_short_of_cpus_or_gpus_are_named_with_what_exists() -> None:
    assert shortfall(64, 1.0, 0.0, TOTAL, TWO_NODES) == [
        "64 CPUs in all (the cluster has 6)"]
    assert shortfall(2, 1.0, 1.0, TOTAL, TWO_NODES) == [
        "2 GPUs in all (the cluster has 1)"]
    assert shortfall(1, 1.0, 1.0, {"CPU": 2.0}, [{"CPU": 2.0}]) == [
        "1 GPUs in all (the cluster has 0)"]


def test_a_worker_cannot_span_nodes() -> None:
    # 5 CPUs exist in all, but no node has 5 for one worker.
    assert shortfall(1, 5.0, 0.0, TOTAL, TWO_NODES) == [
        "5 CPUs and 0 GPUs on one node for each worker (no node has that much)"]
