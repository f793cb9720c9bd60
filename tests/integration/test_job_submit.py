"""`ray job submit` against a real local head, as jobs/README.md tells users to run it.

The test starts its own head with `ray start --head` (dashboard and job API on 127.0.0.1,
token auth on, its own temp dir and ports so it cannot be mistaken for the shared test
cluster), submits a small `raylab train skill` job with the repository as the working dir
and jobs/runtime_env.yaml, waits for SUCCEEDED, checks the run's outputs and that the job
API listens on loopback only, and finally stops only the processes of that head (`ray stop`
would stop every Ray of the user).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop_head(temp_dir: str) -> None:
    """Kill the processes of the head whose temp dir is ``temp_dir`` (and nothing else)."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=20)


def _listening_hosts(port: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_job_submit_to_a_local_head(small_jigsaws_shards: Path, tmp_path: Path) -> None:
    import ray

    if ray.is_initialized():  # one Ray at a time on 2 cores; later tests start it again
        ray.shutdown()
    gcs, dash, client, agent, agent_grpc, metrics, node_mgr, obj_mgr, env_agent = \
        _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: socket paths are limited
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash}")
    ray_cli = str(BIN / "ray")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    start = [ray_cli, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--num-cpus=3", "--disable-usage-stats",
             f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
             f"--runtime-env-agent-port={env_agent}"]
    storage = tmp_path / "runs"
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        submit = [ray_cli, "job", "submit", "--working-dir", str(REPO),
                  "--runtime-env", "jobs/runtime_env.yaml", "--",
                  "raylab", "train", "skill", "--config", "jobs/configs/skill/suturing_loso.yaml",
                  "--data", str(small_jigsaws_shards), "--storage", str(storage), "--name", "job",
                  "--workers", "1", "--set", "folds=[supertrial1]", "--set", "step=10",
                  "--set", "optim.epochs=2"]
        done = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-3000:]
        assert "succeeded" in log.lower(), log[-3000:]
        assert _listening_hosts(dash) == {"127.0.0.1"}  # the job API is not exposed
        summary = json.loads((storage / "job" / "summary.json").read_text())
        assert [f["fold"] for f in summary["folds"]] == ["supertrial1"]
        run = storage / "job" / "supertrial1"
        epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2]
        assert list(run.glob("checkpoint_*")), "no checkpoint"
        # The job ran the submitted code (its copy of the working dir), not something else.
        assert "raylab train skill: experiment job" in log
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
