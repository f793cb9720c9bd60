"""Offline checks of cluster/ and jobs/: no Ray cluster, no cloud calls.

Launcher configs go through Ray's own ``prepare_config`` + ``validate_config``. Both
are offline: ``prepare_config`` merges the provider's ``defaults.yaml`` (shipped
inside Ray) into the config, merges the setup commands, checks the Docker section
and fills in per-type ``max_workers``; ``validate_config`` checks the result
against Ray's ``ray-schema.json`` (unknown keys, non-integer resources) and the
min/max worker arithmetic. Everything that talks to AWS or GCP (key pairs, IAM
roles, subnets, security groups) is in ``bootstrap_aws``/``bootstrap_gcp``, which
``ray up`` runs afterwards and these tests never call. The AWS security-group
rules are computed with the same pure function ``bootstrap_aws`` uses.

The rest checks the promises in jobs/README.md: the head has no GPU, GPU worker
types scale from zero, only SSH is open to the world, the dashboard binds to
loopback, token auth is on, nodes install raylab, images are Ray's own; the
KubeRay manifests have the fields KubeRay needs; and the docs do not drift: every
``raylab`` command in jobs/README.md and the RayJob entrypoint parses with the
real CLI parser, its ``--config`` files load and its ``--space`` specs parse, and
every cluster/ or jobs/ path the README names exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = {"aws": REPO / "cluster" / "aws.yaml", "gcp": REPO / "cluster" / "gcp.yaml"}
KUBERAY = REPO / "cluster" / "kuberay"
JOBS_README = REPO / "jobs" / "README.md"
WORLD = {"0.0.0.0/0", "::/0"}
TOKEN_FILE = "/home/ray/.ray/auth_token"


def ray_version() -> str:
    import ray

    return ray.__version__


def check_image(image: str, where: str) -> None:
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", f"{where}: {image} (ray-ml images are no longer built)"
    assert tag.startswith(f"{ray_version()}-py"), f"{where}: {image} is not Ray {ray_version()}"


# ----------------------------------------------------------------------------- launchers


@pytest.fixture(scope="module", params=sorted(LAUNCHERS))
def launcher(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(provider, the YAML as written, the config Ray prepared and validated)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHERS[request.param].read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    return request.param, raw, prepared


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


def test_launcher_passes_ray_validation(launcher: tuple) -> None:
    name, raw, prepared = launcher
    assert prepared["provider"]["type"] == name
    # Keys Ray's defaults would otherwise supply with other values.
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands",
                "file_mounts", "idle_timeout_minutes", "max_workers"):
        assert key in raw, f"{name}: set {key} explicitly"
    assert prepared["idle_timeout_minutes"] > 0


def test_head_has_no_gpu(launcher: tuple) -> None:
    name, _, prepared = launcher
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) <= 4, "the head should not take training work"
    node = head["node_config"]
    if name == "aws":
        assert not re.match(r"(p\d|g\d|inf|trn|dl)", node["InstanceType"]), node
    else:
        assert not node.get("guestAccelerators"), node
        assert not node["machineType"].startswith(("a2-", "a3-", "a4-", "g2-")), node


def test_gpu_worker_types_scale_from_zero(launcher: tuple) -> None:
    name, _, prepared = launcher
    workers = worker_types(prepared)
    gpus = {k: v["resources"].get("GPU", 0) for k, v in workers.items()}
    assert 1 in gpus.values(), f"{name}: no 1-GPU worker type"
    assert max(gpus.values()) >= 4, f"{name}: no multi-GPU worker type"
    for key, node_type in workers.items():
        if gpus[key]:
            assert node_type["min_workers"] == 0, f"{name}.{key}: GPU nodes must scale to 0"
            assert node_type["max_workers"] >= 1
    assert prepared["max_workers"] >= sum(t["max_workers"] for t in workers.values())
    if name == "gcp":  # resources are not auto-detected on GCP: they must match the VM
        for key, node_type in workers.items():
            node = node_type["node_config"]
            count = sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
            assert count == gpus[key], f"gcp.{key}: resources.GPU != attached GPUs"
            if count:
                assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"


def test_head_binds_dashboard_to_loopback_with_token_auth(launcher: tuple) -> None:
    name, _, prepared = launcher
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, head
    assert "0.0.0.0" not in head
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = " ".join(prepared[commands])
        assert "RAY_AUTH_MODE=token" in text, f"{name}: {commands} without token auth"
    # Every node gets the client's token (`ray get-auth-token --generate`).
    assert prepared["file_mounts"].get(TOKEN_FILE) == "~/.ray/auth_token"


def test_setup_installs_raylab(launcher: tuple) -> None:
    name, _, prepared = launcher
    mounts = prepared["file_mounts"]
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"{name}: file_mounts {remote}: {local} missing"
    installs = [c for c in prepared["setup_commands"] if re.search(r"\bpip install\b", c)]
    target = next(r for r, loc in mounts.items() if loc.rstrip("/") == "./raylab")
    root = str(Path(target).parent)
    assert any(root in c or "raylab @ " in c for c in installs), installs
    assert mounts.get(f"{root}/pyproject.toml") == "./pyproject.toml"


def test_docker_images_are_ray_not_ray_ml(launcher: tuple) -> None:
    name, _, prepared = launcher
    docker = prepared["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    for node_type in prepared["available_node_types"].values():
        images += [v for k, v in node_type.get("docker", {}).items() if k.endswith("image")]
    assert images, f"{name}: no docker image"
    for image in images:
        check_image(image, name)


def aws_ingress_is_ssh_only_from_ranges(rules: list[dict[str, Any]]) -> None:
    """Rules with address ranges allow TCP 22 only; at least one is SSH from anywhere."""
    ranged = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges")]
    for rule in ranged:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
    world = [r for r in ranged
             if {x["CidrIp"] for x in r.get("IpRanges", [])} & WORLD
             or {x["CidrIpv6"] for x in r.get("Ipv6Ranges", [])} & WORLD]
    assert world, "SSH must stay reachable for ray up"


def test_aws_nodes_use_ray_managed_group_and_instance_profiles() -> None:
    config = yaml.safe_load(LAUNCHERS["aws"].read_text())
    assert config["provider"]["security_group"]["GroupName"]
    for key, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        # No pre-made groups: the nodes get the group (and rules) Ray creates.
        assert "SecurityGroupIds" not in node, key
        assert "IamInstanceProfile" in node, f"{key}: no instance profile for S3 access"
    # Extra inbound rules on top of Ray's defaults: none may open more than SSH.
    for rule in config["provider"]["security_group"].get("IpPermissions", []):
        if rule.get("IpRanges") or rule.get("Ipv6Ranges"):
            assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule


def test_aws_security_group_opens_only_ssh_to_the_world() -> None:
    """The rules `ray up` gives a new group: Ray's defaults plus our IpPermissions."""
    # Ray's AWS module imports boto3 at the top; it is in the [dev] extras for this.
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    config = yaml.safe_load(LAUNCHERS["aws"].read_text())
    extra = config["provider"]["security_group"].get("IpPermissions", [])
    rules = _create_default_inbound_rules({"sg-raylab"}, extra)
    assert any(r.get("UserIdGroupPairs") for r in rules), "no intra-cluster rule"
    aws_ingress_is_ssh_only_from_ranges(rules)


# ----------------------------------------------------------------------------- README


def shell_lines(markdown: str) -> list[str]:
    """Logical lines of the ```bash blocks: continuations joined, heredoc bodies skipped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        pending, heredoc = "", None
        for line in block.splitlines():
            if heredoc:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            full = (pending + line).strip()
            pending = ""
            match = re.search(r"<<-?\s*'?(\w+)'?", full)
            heredoc = match.group(1) if match else None
            if full and not full.startswith("#"):
                lines.append(full)
    return lines


def raylab_argv(line: str) -> tuple[list[str], bool] | None:
    """The argv after ``raylab`` in a shell line, and whether it runs as a Ray job."""
    tokens = shlex.split(line, comments=True)
    while tokens and re.match(r"^\w+=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if tokens[:3] == ["ray", "job", "submit"] and "--" in tokens:
        rest = tokens[tokens.index("--") + 1:]
        return (rest[1:], True) if rest[:1] == ["raylab"] else None
    return (tokens[1:], False) if tokens[:1] == ["raylab"] else None


def readme_lines() -> list[str]:
    return shell_lines(JOBS_README.read_text())


def rayjob() -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())


def documented_commands() -> list[tuple[str, list[str], bool]]:
    found = []
    for line in readme_lines():
        parsed = raylab_argv(line)
        if parsed:
            found.append((line, *parsed))
    entrypoint = rayjob()["spec"]["entrypoint"]
    found.append((entrypoint, shlex.split(entrypoint)[1:], True))
    return found


def is_absolute(value: str) -> bool:
    return value.startswith(("/", "$PWD/", "$HOME/")) or "://" in value


def test_readme_documents_train_tune_and_analyze() -> None:
    commands = documented_commands()
    assert {"train", "tune", "analyze"} <= {argv[0] for _, argv, _ in commands}
    assert sum(submitted for *_, submitted in commands) >= 6


COMMANDS = documented_commands()


@pytest.mark.parametrize("line,argv,submitted", COMMANDS,
                         ids=[f"{i}-{argv[0]}" for i, (_, argv, _) in enumerate(COMMANDS)])
def test_documented_command_parses(line: str, argv: list[str], submitted: bool) -> None:
    from raylab import config as cfglib
    from raylab.cli import build_parser
    from raylab.registry import get_method
    from raylab.runtime.search_space import parse_space

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"does not parse: {line}")
    method = get_method(args.method) if getattr(args, "method", None) else None
    if getattr(args, "config", None):
        path = REPO / args.config
        assert path.is_file(), f"{line}: {args.config} missing"
        cfglib.load(method.Config, path, list(args.overrides))
    if method is not None and getattr(args, "space", None):
        parse_space(method.Config, args.space)
    if not submitted:
        return
    # A job runs in a temporary copy of the working dir: relative data/storage paths
    # (and the default --storage runs) would land there.
    if args.command in ("train", "tune") and not getattr(args, "resume", None):
        assert "--data" in argv and "--storage" in argv, line
        assert is_absolute(args.data) and is_absolute(args.storage), line
    for value in (getattr(args, "experiment", None), getattr(args, "resume", None)):
        assert value is None or is_absolute(value), line


def test_submitted_commands_upload_the_working_dir() -> None:
    for line in readme_lines():
        parsed = raylab_argv(line)
        if parsed and parsed[1]:
            assert "--working-dir ." in line, f"relative --config needs it: {line}"


def test_readme_paths_exist() -> None:
    text = JOBS_README.read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:cluster|jobs)/[\w./-]*\w)", text))
    assert {"cluster/aws.yaml", "cluster/gcp.yaml", "jobs/runtime_env.yaml"} <= paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing


def test_readme_has_ports_and_storage_sections() -> None:
    text = JOBS_README.read_text()
    ports = text.split("## Ports and security", 1)[1].split("\n## ", 1)[0]
    for port in ("22", "6379", "8265", "10001", "8076", "52365"):
        assert f"| {port} |" in ports, port
    assert "## Storage" in text


def test_gcp_firewall_in_readme_opens_only_ssh_to_the_world() -> None:
    config = yaml.safe_load(LAUNCHERS["gcp"].read_text())
    commands = [shlex.split(line) for line in readme_lines() if line.startswith("gcloud ")]

    def flags(tokens: list[str]) -> dict[str, str]:
        out, i = {}, 0
        while i < len(tokens):
            if tokens[i].startswith("--"):
                key, eq, value = tokens[i][2:].partition("=")
                if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                    value, i = tokens[i + 1], i + 1
                out[key] = value
            i += 1
        return out

    subnets = {c[5]: flags(c[6:]) for c in commands
               if c[:5] == ["gcloud", "compute", "networks", "subnets", "create"]}
    rules = {c[4]: flags(c[5:]) for c in commands
             if c[:4] == ["gcloud", "compute", "firewall-rules", "create"]}
    assert rules, "jobs/README.md has no firewall rules for GCP"
    networks = set()
    for key, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        tags = node["tags"]["items"]
        # Without networkInterfaces Ray takes the region's first subnet (the default
        # network and whatever rules it has).
        subnet = node["networkInterfaces"][0]["subnetwork"].rsplit("/", 1)[1]
        assert subnet in subnets, f"{key}: subnet {subnet} is not created in the README"
        networks.add(subnets[subnet]["network"])
        for rule in rules.values():
            assert rule["target-tags"] in tags, (key, rule)
        if key != config["head_node_type"]:
            assert node.get("serviceAccounts"), f"{key}: no service account for GCS"
    assert len(networks) == 1
    for name, rule in rules.items():
        assert rule["network"] in networks, name
        assert rule.get("direction", "INGRESS") == "INGRESS", name
        if "source-ranges" in rule:
            # Address ranges get SSH only; node-to-node traffic is matched by tag.
            assert rule["allow"] == "tcp:22", (name, rule)
        else:
            assert rule["source-tags"] == rule["target-tags"], (name, rule)
    world = [r for r in rules.values() if set(r.get("source-ranges", "").split(",")) & WORLD]
    assert world, "SSH must stay reachable for ray up"


# ----------------------------------------------------------------------------- KubeRay


def kuberay_docs(name: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def pod_specs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    head = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return head + [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["rayVersion"] == ray_version(), where
    assert spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head exposed"
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not bad, f"{where}: rayStartParams values must be strings: {bad}"
    mounts = set()
    for group, pod in pod_specs(spec):
        container = pod["containers"][0]
        check_image(container["image"], f"{where}/{group}")
        resources = container["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        if group == "head":
            assert gpus is None and "nvidia.com/gpu" not in resources.get("requests", {})
        else:
            assert gpus is not None and int(str(gpus)) >= 1, f"{where}/{group}: no GPU limit"
            request = resources.get("requests", {}).get("nvidia.com/gpu", gpus)
            assert str(request) == str(gpus), f"{where}/{group}: GPU request != limit"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts.add(frozenset((claims[m["name"]], m["mountPath"])
                             for m in container.get("volumeMounts", []) if m["name"] in claims))
    assert len(mounts) == 1 and next(iter(mounts)), f"{where}: shared volume differs per pod"
    for g in groups:
        assert g["groupName"] and g["minReplicas"] == 0, f"{where}: {g['groupName']}"
        assert isinstance(g["maxReplicas"], int) and g["maxReplicas"] >= 1
        assert 0 <= g.get("replicas", 0) <= g["maxReplicas"]


def test_raycluster_manifest() -> None:
    docs = kuberay_docs("raycluster.yaml")
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    check_cluster_spec(cluster["spec"], "raycluster.yaml")
    pvc = docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    claims = {v["persistentVolumeClaim"]["claimName"]
              for _, pod in pod_specs(cluster["spec"]) for v in pod["volumes"]}
    assert claims == {pvc["metadata"]["name"]}


def test_rayjob_manifest() -> None:
    from ray.runtime_env import RuntimeEnv

    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].split()[0] == "raylab"
    assert spec["shutdownAfterJobFinishes"] is True
    # KubeRay hands this to `ray job submit --runtime-env-json "..."` in a shell:
    # a "$" would be expanded there, before Ray or pip see it.
    assert "$" not in spec["runtimeEnvYAML"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"].endswith(".zip")
    check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    pvc = kuberay_docs("raycluster.yaml")["PersistentVolumeClaim"]["metadata"]["name"]
    claims = {v["persistentVolumeClaim"]["claimName"]
              for _, pod in pod_specs(spec["rayClusterSpec"]) for v in pod["volumes"]}
    assert claims == {pvc}


# ----------------------------------------------------------------------------- jobs/


def test_runtime_env_file() -> None:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # types of env_vars, excludes, pip, ...
    assert "working_dir" not in env, "`ray job submit --working-dir .` sets it"
    assert "-e ." not in str(env.get("pip", "")), "pip runs outside the working dir"
    assert env["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_config_loads(path: Path) -> None:
    from raylab import config as cfglib
    from raylab.registry import get_method

    cfg = cfglib.load(get_method(path.parent.name).Config, path)
    assert not getattr(cfg, "data", ""), "--data belongs on the command line"


def test_dino_cpu_recipe_is_the_benchmarked_one() -> None:
    """jobs/configs/dino/cifar_cpu.yaml is what `raylab bench dino-cifar` measures."""
    from raylab import config as cfglib
    from raylab.bench.images import DINO_BUDGET
    from raylab.methods.dino import DINOConfig

    from_file = cfglib.load(DINOConfig, REPO / "jobs" / "configs" / "dino" / "cifar_cpu.yaml")
    from_bench = cfglib.apply_overrides(DINOConfig(), DINO_BUDGET)
    assert cfglib.to_dict(from_file) == cfglib.to_dict(from_bench)


def test_convnext_cpu_recipe_is_the_benchmarked_one() -> None:
    """jobs/configs/convnext/cifar_cpu.yaml is what `raylab bench convnext-cifar` measures."""
    from raylab import config as cfglib
    from raylab.bench.images import CIFAR_SHORT_RECIPE
    from raylab.methods.convnext.config import ConvNeXtConfig

    path = REPO / "jobs" / "configs" / "convnext" / "cifar_cpu.yaml"
    from_file = cfglib.load(ConvNeXtConfig, path)
    from_bench = cfglib.apply_overrides(ConvNeXtConfig(), CIFAR_SHORT_RECIPE)
    assert cfglib.to_dict(from_file) == cfglib.to_dict(from_bench)
    short = cfglib.load(ConvNeXtConfig, path, overrides={"optim.epochs": 15})
    assert short.short_schedule_warning() is None, "the short recipe must not warn"
