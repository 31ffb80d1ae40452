"""Every file in cluster/ parses, has the fields its launcher needs, and every `gaelle ...`
command it shows (as a YAML value or as a `$ ` example line in its comments) is accepted by
the CLI parser, with its experiments/ config loading and its --set overrides valid."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from gaelle_ray.cli import build_parser
from gaelle_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
EXPECTED = {
    "aws-gpu.yaml": "launcher",
    "gcp-gpu.yaml": "launcher",
    "kuberay-raycluster.yaml": "kuberay",
    "kuberay-rayjob.yaml": "kuberay",
    "runtime_env.yaml": "runtime_env",
}
RAY_VERSION = importlib.metadata.version("ray")
CLOUD_SCHEMES = ("s3://", "gs://")


def _files() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.is_file())


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(path: Path, docs: list) -> str:
    if path.name == "runtime_env.yaml":
        return "runtime_env"
    if len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]:
        return "launcher"
    if any(isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/") for d in docs):
        return "kuberay"
    return "unknown"


def _by_kind(kind: str) -> list[Path]:
    return [CLUSTER / name for name, k in EXPECTED.items() if k == kind]


# ----------------------------------------------------------------------------- commands in files


_GAELLE_LINE = re.compile(r"(^|[\s/\"'])gaelle\s|gaelle_ray\.cli\b")
_OPERATORS = {"&&", "||", ";", "|", "&", ";;"}


def _argvs_in(command: str) -> list[list[str]]:
    """argv lists after `gaelle` (or `python -m gaelle_ray.cli`) in a shell command line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    segments, current = [], []
    for tok in tokens:
        if tok in _OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    found = []
    for seg in segments:
        for tok in seg:  # quoted sub-commands: ray exec "... && gaelle ..."
            if " " in tok and _GAELLE_LINE.search(tok):
                found.extend(_argvs_in(tok))
        for i, tok in enumerate(seg):
            if tok == "gaelle" or tok.endswith("/gaelle"):
                rest = seg[i + 1:]
            elif tok == "gaelle_ray.cli" and i > 0 and seg[i - 1] == "-m":
                rest = seg[i + 1:]
            else:
                continue
            for j, t in enumerate(rest):  # drop redirections: `gaelle --help > /dev/null`
                if t and set(t) <= set("<>&0123456789") and ("<" in t or ">" in t):
                    rest = rest[:j]
                    break
            found.append(rest)
            break
    return found


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _comment_commands(text: str) -> list[str]:
    """`$ command` lines of full-line comments, `\\` continuations joined."""
    commands, pending = [], None
    for line in text.splitlines():
        stripped = line.strip()
        body = stripped[1:].strip() if stripped.startswith("#") else None
        if pending is not None:
            if body is None:
                commands.append(pending)
                pending = None
            else:
                pending += " " + body.rstrip("\\").strip()
                if not body.endswith("\\"):
                    commands.append(pending)
                    pending = None
                continue
        if body is not None and body.startswith("$ "):
            cmd = body[2:].strip()
            if cmd.endswith("\\"):
                pending = cmd.rstrip("\\").strip()
            else:
                commands.append(cmd)
    if pending is not None:
        commands.append(pending)
    return commands


def _gaelle_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(where, argv) of every gaelle command in a cluster file."""
    text = path.read_text()
    out = []
    for doc in _docs(path):
        for s in _strings(doc):
            for line in s.splitlines():
                if _GAELLE_LINE.search(line):
                    out += [(f"{path.name}: value {line.strip()[:80]!r}", a) for a in _argvs_in(line)]
    for cmd in _comment_commands(text):
        if _GAELLE_LINE.search(cmd):
            out += [(f"{path.name}: comment {cmd[:80]!r}", a) for a in _argvs_in(cmd)]
    return out


def test_command_extraction_helpers():
    assert _argvs_in("ray job submit --working-dir . -- gaelle pretrain --config a.yaml --gpu") == [
        ["pretrain", "--config", "a.yaml", "--gpu"]]
    assert _argvs_in('ray exec c.yaml "cd ~/gaelle-ray && gaelle config show --config x.yaml"') == [
        ["config", "show", "--config", "x.yaml"]]
    assert _argvs_in("gaelle --help > /dev/null") == [["--help"]]
    assert _argvs_in("python -m gaelle_ray.cli prepare toy --out d") == [["prepare", "toy", "--out", "d"]]
    assert _argvs_in("pip install -e ~/gaelle-ray") == []
    assert _comment_commands("# $ gaelle pretrain \\\n#   --config a.yaml\n# prose gaelle x\n") == [
        "gaelle pretrain --config a.yaml"]


# ----------------------------------------------------------------------------- every file


def test_every_cluster_file_parses_and_is_known():
    names = {p.name for p in _files()}
    assert set(EXPECTED) <= names, f"missing cluster files: {sorted(set(EXPECTED) - names)}"
    for path in _files():
        assert path.suffix in (".yaml", ".yml"), f"{path.name}: only YAML files belong in cluster/"
        docs = _docs(path)
        assert docs, f"{path.name}: empty"
        kind = _kind(path, docs)
        assert kind != "unknown", f"{path.name}: neither a launcher config, a KubeRay manifest nor a runtime_env"
        assert kind == EXPECTED.get(path.name, kind), f"{path.name}: expected a {EXPECTED[path.name]} file"
        lines = path.read_text().splitlines()
        header = "\n".join(line for line in lines[:next((i for i, l in enumerate(lines)
                                                          if l.strip() and not l.startswith("#")), len(lines))])
        assert header.startswith("#"), f"{path.name}: must start with its documentation comment"
        for section in ("WHAT IT IS", "HOW TO", "WHAT TO EDIT"):
            assert section in header, f"{path.name}: header comment lacks '{section}'"


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_gaelle_commands_are_accepted_by_the_cli(path):
    commands = _gaelle_commands(path)
    assert commands, f"{path.name}: shows no gaelle command"
    parser = build_parser()
    for where, argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code == 0 and ("--help" in argv or "-h" in argv):
                continue
            pytest.fail(f"{where}: `gaelle {' '.join(argv)}` is rejected by the CLI parser")
        assert getattr(args, "handler", None) is not None, f"{where}: `gaelle {' '.join(argv)}` runs no command"
        if getattr(args, "config", None):
            config_path = ROOT / args.config
            assert config_path.is_file(), f"{where}: config {args.config} does not exist"
            load_config(config_path, args.overrides)  # the --set keys and values are valid


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_referenced_experiment_files_exist(path):
    for ref in re.findall(r"experiments/[\w./-]+?\.ya?ml", path.read_text()):
        assert (ROOT / ref).is_file(), f"{path.name} refers to {ref}, which does not exist"


def test_remote_storage_is_shown():
    """The cluster runs keep shards and checkpoints on object storage (--set overrides)."""
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml", "kuberay-rayjob.yaml"):
        argvs = [a for _, a in _gaelle_commands(CLUSTER / name) if a[:1] == ["pretrain"]]
        assert argvs, name
        for argv in argvs:
            args = build_parser().parse_args(argv)
            config = load_config(ROOT / args.config, args.overrides)
            assert config.train.run_dir.startswith(CLOUD_SCHEMES), f"{name}: {config.train.run_dir}"
            assert config.data.shards.startswith(CLOUD_SCHEMES), f"{name}: {config.data.shards}"


# ----------------------------------------------------------------------------- cluster launcher


def _ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", _by_kind("launcher"), ids=lambda p: p.name)
def test_launcher_config(path):
    (cfg,) = _docs(path)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, f"{path.name}: {key} missing"
    assert cfg["provider"]["type"] in ("aws", "gcp", "azure", "kubernetes", "local"), cfg["provider"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        assert isinstance(node.get("node_config"), dict) and node["node_config"], f"{name}: node_config"
        assert isinstance(node.get("resources"), dict) and node["resources"].get("CPU", 0) > 0, f"{name}: resources"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu_only = [n for n, t in workers.items() if t["resources"].get("GPU", 0) == 0]
    assert gpu, f"{path.name}: no GPU worker type"
    assert cpu_only, f"{path.name}: no CPU-only worker type for the data stream"
    for name in gpu + cpu_only:
        node = types[name]
        assert 0 <= node.get("min_workers", 0) <= node.get("max_workers", cfg["max_workers"]), name
    assert sum(types[n].get("min_workers", 0) for n in workers) <= cfg["max_workers"]

    # the package gets installed on every node
    setup = [str(c) for c in cfg.get("setup_commands") or []]
    docker = cfg.get("docker") or {}
    assert setup or docker.get("image") or docker.get("head_image"), f"{path.name}: no setup_commands or docker"
    assert any("pip install" in c and ("-e " in c or ".whl" in c) for c in setup), \
        f"{path.name}: setup_commands do not install gaelle-ray"
    for remote, local in (cfg.get("file_mounts") or {}).items():
        assert (ROOT / local).exists(), f"{path.name}: file mount {remote}: {local} not found"
    # images match the Ray version the package pins
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [(t.get("docker") or {}).get("worker_image") for t in types.values()]
    for image in filter(None, images):
        assert image.startswith(f"rayproject/ray:{RAY_VERSION}"), f"{path.name}: {image} is not Ray {RAY_VERSION}"
    for name in gpu:
        image = (types[name].get("docker") or {}).get("worker_image") or docker.get("worker_image") or docker.get("image")
        if image:
            assert "gpu" in image or "cu1" in image, f"{path.name}: GPU type {name} runs the CPU image {image}"

    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(cfg, _ray_schema())  # Ray's own launcher schema (field names, types)


# ----------------------------------------------------------------------------- KubeRay


def _quantity(value) -> float:
    return float(str(value))


def _gpus(container: dict, which: str = "limits") -> float:
    return _quantity(((container.get("resources") or {}).get(which) or {}).get("nvidia.com/gpu", 0))


def _check_pod_template(where: str, template: dict) -> list[dict]:
    containers = ((template or {}).get("spec") or {}).get("containers") or []
    assert containers, f"{where}: template.spec.containers missing"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: container needs name and image"
        assert c["image"].startswith(f"rayproject/ray:{RAY_VERSION}") or "gaelle" in c["image"], \
            f"{where}: image {c['image']} is not Ray {RAY_VERSION}"
        limits = (c.get("resources") or {}).get("limits") or {}
        assert "cpu" in limits and "memory" in limits, f"{where}: set cpu and memory limits"
    return containers


def _check_cluster_spec(where: str, spec: dict, service_accounts: set[str]) -> None:
    assert str(spec.get("rayVersion")) == RAY_VERSION, f"{where}: rayVersion {spec.get('rayVersion')}"
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}: headGroupSpec missing"
    assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams missing"
    for key, value in head["rayStartParams"].items():  # map[string]string in the CRD
        assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a string, got {value!r}"
    _check_pod_template(f"{where} head", head.get("template"))
    groups = spec.get("workerGroupSpecs")
    assert isinstance(groups, list) and groups, f"{where}: workerGroupSpecs missing"
    names = [g.get("groupName") for g in groups]
    assert all(names) and len(set(names)) == len(names), f"{where}: groupNames {names}"
    gpu_groups, cpu_groups = [], []
    for g in groups:
        gw = f"{where} group {g['groupName']}"
        assert isinstance(g.get("rayStartParams"), dict), f"{gw}: rayStartParams missing"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), f"{gw}: rayStartParams values must be strings"
        assert g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 2**31 - 1), gw
        containers = _check_pod_template(gw, g.get("template"))
        gpus = sum(_gpus(c) for c in containers)
        for c in containers:
            requested = ((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu")
            if requested is not None:  # extended resources: requests must equal limits
                assert _quantity(requested) == _gpus(c), f"{gw}: nvidia.com/gpu requests != limits"
        (gpu_groups if gpus >= 1 else cpu_groups).append(g["groupName"])
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
    assert cpu_groups, f"{where}: no CPU-only worker group for the data stream"
    for group in [head] + groups:
        account = ((group.get("template") or {}).get("spec") or {}).get("serviceAccountName")
        if account:
            assert account in service_accounts, f"{where}: serviceAccountName {account} is not defined in the file"


def _check_runtime_env(where: str, env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    assert isinstance(env, dict), f"{where}: not a mapping"
    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"{where}: unknown runtime_env fields {sorted(unknown)}"
    RuntimeEnv(**env)  # Ray's own validation (pip fields, env_vars types, config)
    assert env.get("working_dir"), f"{where}: working_dir missing"
    pip = env.get("pip") or {}
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    installs = [p for p in packages if "RAY_RUNTIME_ENV_CREATE_WORKING_DIR" in p or p.endswith(".whl")]
    assert installs or env.get("py_modules"), f"{where}: does not install gaelle-ray (pip or py_modules)"
    assert all(isinstance(v, str) for v in (env.get("env_vars") or {}).values()), f"{where}: env_vars must be strings"


@pytest.mark.parametrize("path", _by_kind("kuberay"), ids=lambda p: p.name)
def test_kuberay_manifests(path):
    docs = _docs(path)
    for doc in docs:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{path.name}: {doc!r:.80}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without metadata.name"
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    ray_docs = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert ray_docs and all(d["apiVersion"] == "ray.io/v1" for d in ray_docs)
    kinds = {d["kind"] for d in ray_docs}
    assert kinds <= {"RayCluster", "RayJob"}, kinds
    for doc in ray_docs:
        where = f"{path.name} {doc['kind']}"
        if doc["kind"] == "RayCluster":
            _check_cluster_spec(where, doc["spec"], accounts)
        else:
            spec = doc["spec"]
            entry = spec.get("entrypoint", "")
            assert entry.startswith("gaelle pretrain"), f"{where}: entrypoint {entry!r}"
            assert "--address auto" in entry
            assert isinstance(spec.get("shutdownAfterJobFinishes", False), bool)
            _check_runtime_env(f"{where} runtimeEnvYAML", yaml.safe_load(spec["runtimeEnvYAML"]))
            _check_cluster_spec(where, spec["rayClusterSpec"], accounts)
    expected_kind = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}.get(path.name)
    if expected_kind:
        assert expected_kind in kinds, f"{path.name}: no {expected_kind}"


# ----------------------------------------------------------------------------- runtime_env


def test_runtime_env_file():
    (env,) = _docs(CLUSTER / "runtime_env.yaml")
    _check_runtime_env("runtime_env.yaml", env)
    assert env["working_dir"] == ".", "working_dir is the repository root (submit from there)"
    excludes = set(env.get("excludes", []))
    assert {".git", ".venv", "runs"} <= excludes, "keep the upload small: exclude .git, .venv and runs"
