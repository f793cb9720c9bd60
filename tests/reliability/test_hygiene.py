"""Security and hygiene checks of issue 6 (no Ray, no network).

* Source scans with ``ast``: every ``torch.load`` in ``raylab/`` passes
  ``weights_only=True``; nothing calls ``eval``/``exec``, a pickle loader or a YAML loader
  that can build Python objects. Each scanner is first shown to catch what it looks for.
* Config values that look like code stay strings or are refused, never run.
* ``cluster/`` and ``jobs/`` bind no dashboard to every interface without saying why, and
  hold no literal secrets (tests/unit/test_cluster_configs.py checks the launchers' head
  commands; this scans every file, KubeRay and docs included).
* Secrets in the environment never reach the files raylab writes.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import raylab.runtime.cluster
from raylab import config as cfglib
from raylab.cli import main
from raylab.methods.skill import SkillConfig

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "raylab"


# --------------------------------------------------------------------- ast scanning


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name it was imported as (``th`` -> ``torch``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, imports: dict[str, str]) -> str | None:
    """``torch.load`` for ``th.load`` after ``import torch as th``; None if not a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(imports.get(node.id, node.id))
    return ".".join(reversed(parts))


def _calls(tree: ast.Module) -> Iterator[tuple[ast.Call, str]]:
    imports = _imports(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func, imports)
            if name is not None:
                yield node, name


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


def _safe_loader_classes(tree: ast.Module) -> set[str]:
    """Classes of the module that derive (directly or in a chain) from a safe YAML loader."""
    imports = _imports(tree)
    found: set[str] = set()
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    changed = True
    while changed:
        changed = False
        for cls in classes:
            bases = {_dotted(b, imports) for b in cls.bases}
            if cls.name not in found and bases & (SAFE_LOADERS | found):
                found.add(cls.name)
                changed = True
    return found


def torch_load_problems(source: str, where: str = "<source>") -> tuple[int, list[str]]:
    """(number of torch.load calls, those without ``weights_only=True``)."""
    tree = ast.parse(source)
    count, problems = 0, []
    for call, name in _calls(tree):
        if name == "torch.load":
            count += 1
            flag = _keyword(call, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
    return count, problems


UNSAFE_CALLS = {
    "eval", "exec", "builtins.eval", "builtins.exec",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
    "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads", "marshal.load",
    "marshal.loads", "shelve.open", "yaml.unsafe_load", "yaml.unsafe_load_all",
    "yaml.full_load", "yaml.full_load_all",
}
YAML_LOADS = {"yaml.load", "yaml.load_all"}


def unsafe_call_problems(source: str, where: str = "<source>") -> list[str]:
    """Calls that run code or build arbitrary objects from data."""
    tree = ast.parse(source)
    safe = SAFE_LOADERS | _safe_loader_classes(tree)
    imports = _imports(tree)
    problems = []
    for call, name in _calls(tree):
        if name in UNSAFE_CALLS:
            problems.append(f"{where}:{call.lineno}: {name}()")
        elif name in YAML_LOADS:
            loader = _keyword(call, "Loader")
            if loader is None and len(call.args) > 1:
                loader = call.args[1]
            if loader is None or _dotted(loader, imports) not in safe:
                problems.append(f"{where}:{call.lineno}: {name}() without a SafeLoader")
    return problems


def package_sources() -> list[tuple[str, str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, "the scan found too few files to be meaningful"
    return [(str(p.relative_to(REPO)), p.read_text(encoding="utf-8")) for p in files]


@pytest.mark.parametrize(("source", "flagged"), [
    ("import torch\ntorch.load('x')\n", 1),
    ("import torch\ntorch.load('x', weights_only=False)\n", 1),
    ("import torch as th\nth.load('x', map_location='cpu')\n", 1),
    ("from torch import load\nload('x')\n", 1),
    ("import torch\ntorch.load('x', map_location='cpu', weights_only=True)\n", 0),
    ("import numpy as np\nnp.load('x')\n", 0),
])
def test_torch_load_scanner_catches_unsafe_calls(source: str, flagged: int) -> None:
    assert len(torch_load_problems(source)[1]) == flagged


def test_every_torch_load_passes_weights_only_true() -> None:
    total, problems = 0, []
    for where, source in package_sources():
        count, found = torch_load_problems(source, where)
        total += count
        problems += found
    assert problems == []
    assert total >= 1, "no torch.load found: has checkpoint loading moved?"


@pytest.mark.parametrize(("source", "flagged"), [
    ("eval('1 + 1')\n", 1),
    ("exec('x = 1')\n", 1),
    ("import pickle\npickle.loads(b'')\n", 1),
    ("from pickle import load\nload(open('f', 'rb'))\n", 1),
    ("import cloudpickle as cp\ncp.loads(b'')\n", 1),
    ("import yaml\nyaml.load('a: 1')\n", 1),
    ("import yaml\nyaml.load('a: 1', Loader=yaml.Loader)\n", 1),
    ("import yaml\nyaml.load('a: 1', yaml.UnsafeLoader)\n", 1),
    ("import yaml\nyaml.unsafe_load('a: 1')\n", 1),
    ("import yaml\nyaml.load('a: 1', Loader=yaml.SafeLoader)\n", 0),
    ("import yaml\nyaml.safe_load('a: 1')\n", 0),
    ("import yaml\nclass L(yaml.SafeLoader):\n    pass\nclass M(L):\n    pass\n"
     "yaml.load('a: 1', Loader=M)\n", 0),
    ("import yaml\nclass L(yaml.Loader):\n    pass\nyaml.load('a: 1', Loader=L)\n", 1),
    ("model.eval()\n", 0),
    ("import re\nre.compile('x')\n", 0),
])
def test_unsafe_call_scanner_catches_them(source: str, flagged: int) -> None:
    assert len(unsafe_call_problems(source)) == flagged


def test_no_eval_exec_pickle_or_unsafe_yaml_in_package() -> None:
    problems = [p for where, source in package_sources()
                for p in unsafe_call_problems(source, where)]
    assert problems == []


def test_local_ray_binds_its_dashboard_to_loopback() -> None:
    """ensure_ray's ray.init for a local cluster passes dashboard_host='127.0.0.1', and
    address='local' (a new cluster, never one that `ray start` left running)."""
    path = PACKAGE / "runtime" / "cluster.py"
    calls = [call for call, name in _calls(ast.parse(path.read_text()))
             if name == "ray.init" and _keyword(call, "num_cpus") is not None]
    assert calls, "no local ray.init(num_cpus=...) found in raylab/runtime/cluster.py"
    for call in calls:
        host, address = _keyword(call, "dashboard_host"), _keyword(call, "address")
        assert isinstance(host, ast.Constant) and host.value == "127.0.0.1", ast.dump(host)
        assert isinstance(address, ast.Constant) and address.value == "local", \
            ast.dump(call)


# ------------------------------------------------------------ config values as code


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple]:
    """Ray must not start; os.system calls are recorded, not run."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was about to start; the error must come before")

    calls: list[tuple] = []
    monkeypatch.setattr(raylab.runtime.cluster, "ensure_ray", refuse)
    monkeypatch.setattr(os, "system", lambda *a: calls.append(("os.system", a)) or 0)
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.fixture(scope="module")
def shards(tiny_jigsaws_shards: Path) -> Path:
    return tiny_jigsaws_shards


TOUCH = '__import__("os").system("touch X")'


@pytest.mark.parametrize(("args", "fragment"), [
    (["--set", f"window={TOUCH}"], "config key 'window': expected int, got '__import__"),
    (["--set", f"task={TOUCH}"], "config key 'task': expected one of Suturing"),
    (["--set", f"folds=['{TOUCH}']"], "config key 'folds': unknown fold '__import__"),
    (["--set", 'task=!!python/object/apply:os.system ["touch X"]'],
     "--set task: cannot parse value"),
    (["--set", "optim.lr={{ 1 + 1 }}"], "--set optim.lr: cannot parse value"),
    (["--set", "window=${X}"], "config key 'window': expected int, got '${X}'"),
])
def test_code_in_set_is_kept_as_text_or_refused(args: list[str], fragment: str, shards: Path,
                                                tmp_path: Path, no_ray: list[tuple],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "skill", "--data", str(shards), "--storage", str(tmp_path / "runs"),
               *args])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1, (rc, out, err)
    assert err.startswith("raylab: error: ") and fragment in err, err
    assert "Traceback" not in err
    assert no_ray == [] and list(tmp_path.iterdir()) == []  # no X, no runs/


def test_code_in_space_is_refused(shards: Path, tmp_path: Path, no_ray: list[tuple],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["tune", "skill", "--data", str(shards), "--storage", str(tmp_path / "runs"),
               "--space", f"window=[30, '{TOUCH}']"])
    err = capsys.readouterr().err
    assert rc == 2 and "config key 'window': expected int" in err, err
    assert no_ray == [] and list(tmp_path.iterdir()) == []


def test_code_looking_strings_stay_strings() -> None:
    cfg = cfglib.apply_overrides(SkillConfig(), [f"folds=['{TOUCH}', '$(touch X)']"])
    assert cfg.folds == [TOUCH, "$(touch X)"]
    assert cfglib.parse_value("__import__('os')") == "__import__('os')"
    assert cfglib.parse_value("!!str 5") == "5"


# --------------------------------------------------------------- cluster/ and jobs/


def text_files(*folders: str) -> list[Path]:
    files = [p for folder in folders for p in sorted((REPO / folder).rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts]
    assert files, folders
    return files


DASHBOARD_HOST = re.compile(r"dashboard[-_]host[\"']?\s*(?:[:=]|\s)\s*[\"']?([^\s\"',]+)")
ALL_INTERFACES = {"0.0.0.0", "::", "[::]"}
# Why a dashboard may listen on every interface: only inside a pod behind a ClusterIP
# service, which jobs/README.md ("Ports and security") explains.
WHY = re.compile(r"ClusterIP", re.IGNORECASE)


def test_dashboard_host_scanner() -> None:
    found = [m.group(1) for m in DASHBOARD_HOST.finditer(
        'a --dashboard-host=0.0.0.0 b\n dashboard-host: "0.0.0.0"\n'
        "dashboard_host='127.0.0.1'\n--dashboard-host 0.0.0.0\n")]
    assert found == ["0.0.0.0", "0.0.0.0", "127.0.0.1", "0.0.0.0"]


def test_dashboard_binds_to_all_interfaces_only_where_documented() -> None:
    readme = (REPO / "jobs" / "README.md").read_text()
    security = readme.split("## Ports and security", 1)[1].split("\n## ", 1)[0]
    bindings = []
    for path in text_files("cluster", "jobs"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            for match in DASHBOARD_HOST.finditer(line):
                bindings.append((path, number, match.group(1)))
                if match.group(1) not in ALL_INTERFACES:
                    continue
                where = f"{path.relative_to(REPO)}:{number}"
                assert path.parent.name == "kuberay", f"{where}: dashboard on every interface"
                comments = [c for c in lines[max(0, number - 12):number] if "#" in c]
                assert any(WHY.search(c) for c in comments), f"{where}: no comment says why"
                assert "listens on all interfaces" in security, "jobs/README.md must say so"
    hosts = {host for *_, host in bindings}
    assert "127.0.0.1" in hosts, "the scan found no dashboard binding at all"


SECRETS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key\s*[:=]\s*(?![\"']?\$)[\"']?\S",
                                 re.IGNORECASE),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
    "GCP service-account key": re.compile(r"\"private_key(?:_id)?\"\s*:"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
}


@pytest.mark.parametrize(("text", "kind"), [
    ("key: AKIAABCDEFGHIJKLMNOP\n", "AWS access key id"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG\n", "AWS secret key"),
    ("AWS_SECRET_ACCESS_KEY: 'abc'\n", "AWS secret key"),
    ("-----BEGIN RSA PRIVATE KEY-----\n", "private key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\n", "private key"),
    ('{"private_key": "x"}', "GCP service-account key"),
])
def test_secret_patterns_catch_samples(text: str, kind: str) -> None:
    assert [k for k, rx in SECRETS.items() if rx.search(text)] == [kind]


def test_secret_patterns_leave_references_alone() -> None:
    text = ("aws_secret_access_key: $AWS_SECRET_ACCESS_KEY\n"
            "export AWS_SECRET_ACCESS_KEY=\"${AWS_SECRET_ACCESS_KEY}\"\n"
            "secretName: raylab-ray-token\n")
    assert [k for k, rx in SECRETS.items() if rx.search(text)] == []


def test_no_literal_secrets_in_cluster_and_jobs() -> None:
    found = []
    for path in text_files("cluster", "jobs"):
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(REPO)}: {kind}" for kind, rx in SECRETS.items()
                  if rx.search(text)]
    assert found == []


# ------------------------------------------------------ environment secrets in files

SECRET_ENV = {"AWS_SECRET_ACCESS_KEY": "sekrit-xyz-aws-9c1f",
              "AWS_SESSION_TOKEN": "sekrit-xyz-session-52aa",
              "RAY_AUTH_TOKEN": "sekrit-xyz-ray-77d0",
              "RAYLAB_TEST_PASSWORD": "sekrit-xyz-pw-0b3e"}


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if p.is_file() and any(n in p.read_bytes() for n in needles)]


def test_environment_secrets_never_reach_written_files(tmp_path: Path, no_ray: list[tuple],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Every CLI command that writes files before Ray, run with secrets in the environment."""
    for key, value in SECRET_ENV.items():
        monkeypatch.setenv(key, value)
    from raylab.data.jigsaws import write_sample

    write_sample(tmp_path / "jigsaws_raw", tasks=("Suturing",), subjects="BD",
                 trials=(1, 2), frames=(100, 120))
    commands = [
        ["data", "convert", "jigsaws", "jigsaws_raw", "jigsaws_shards"],
        ["data", "sample", "images", "images", "--classes", "2", "--train-per-class", "3",
         "--test-per-class", "1", "--size", "8"],
        ["data", "convert", "imagefolder", "images", "image_shards"],
        ["data", "sample", "clear", "clear_raw", "--from", "images", "--per-class", "1",
         "--buckets", "3"],
        ["data", "convert", "clear", "clear_raw", "clear_stream"],
        ["data", "inspect", "jigsaws_shards", "--json"],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
    # train writes its storage folder (and a write test) before Ray would start.
    with pytest.raises(AssertionError, match="Ray was about to start"):
        main(["train", "skill", "--data", "jigsaws_shards", "--storage", "runs",
              "--set", "optim.epochs=1"])
    out, err = capsys.readouterr()
    needles = [v.encode() for v in SECRET_ENV.values()]
    assert files_holding(tmp_path, needles) == []
    assert not any(v in out + err for v in SECRET_ENV.values())
    manifest = json.loads((tmp_path / "jigsaws_shards" / "manifest.json").read_text())
    assert manifest["format"] == "jigsaws"  # the scan did look at real output
    assert (tmp_path / "runs").is_dir() and (tmp_path / "clear_stream").is_dir()


def test_saved_config_holds_only_config_values(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """config.yaml (save_yaml) is the resolved config, nothing from the environment."""
    for key, value in SECRET_ENV.items():
        monkeypatch.setenv(key, value)
    cfg = cfglib.load(SkillConfig, None, ["window=30", "data=/data/shards"])
    cfglib.save_yaml(cfg, tmp_path / "config.yaml")
    assert files_holding(tmp_path, [v.encode() for v in SECRET_ENV.values()]) == []
    assert cfglib.load(SkillConfig, tmp_path / "config.yaml") == cfg
