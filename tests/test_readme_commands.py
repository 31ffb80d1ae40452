"""The README's toy-scale commands, run exactly as written in a temporary copy of the
repository, from its root, with the README's relative paths.

Each command below must appear verbatim in a ```bash block of README.md (a README that
drifts from this list fails here); the test appends only options that shorten it (fewer
toy images, no torch.compile warm-up), never ones that change paths. The commands run in
README order: the data, `config show`, pretraining (2 epochs), the fast linear probe and
the attention maps of its run folder (its newest checkpoint), the toy sweep and its
`--resume`. This is the end-to-end test of the sweep too (it replaced one that passed
absolute paths and so missed the relative-path bugs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SMALL_TOY = "--n-train 128 --n-val 64 --image-size 64"
NO_COMPILE = "--set augmentation.compile_cpu_colour=false"

# (the README line, as written; what the test appends to shorten it)
COMMANDS = [
    ("gaelle make-toy --out runs/toy/raw", "--n-train 8 --n-val 4 --image-size 64"),
    ("gaelle prepare toy --out runs/toy/shards", SMALL_TOY),
    ("gaelle config show --config experiments/coco2017_400ep.yaml --set optim.base_lr=0.3", ""),
    ("gaelle pretrain --config experiments/cpu_demo.yaml --cpu",
     f"--set train.epochs=2 {NO_COMPILE} --set eval.online_bank_images=64"),
    ("gaelle linear-eval --checkpoint runs/cpu_demo/train --dataset toy --data runs/toy/shards --fast",
     "--set eval.epochs=5"),
    ("gaelle show-attention --checkpoint runs/cpu_demo/train --images runs/toy/raw/val --out runs/attention", ""),
    ("gaelle prepare toy --out runs/toy_tiny/shards --n-train 128 --n-val 64 --image-size 64", ""),
    ("gaelle sweep --config experiments/sweeps/toy_tiny.yaml", ""),
    ("gaelle sweep --config experiments/sweeps/toy_tiny.yaml --resume", ""),
]


def readme_bash_lines() -> list[str]:
    """Every command line of README.md's ```bash blocks, trailing `# comment` removed."""
    lines, inside = [], False
    for raw in README.read_text(encoding="utf-8").splitlines():
        if raw.startswith("```"):
            inside = raw.strip() == "```bash"
            continue
        if inside:
            lines.append(re.sub(r"\s+#.*$", "", raw).strip())
    return lines


def test_every_command_is_in_the_readme_as_written():
    lines = readme_bash_lines()
    missing = [command for command, _ in COMMANDS if command not in lines]
    assert not missing, f"README.md no longer has these commands (update the README or this list): {missing}"


def _copy_repo(dest: Path) -> Path:
    """The repository as a fresh clone has it: tracked and untracked files, no virtualenv,
    no runs, no caches."""
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", "*.egg-info")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _run(command: str, cwd: Path, timeout: int = 600) -> str:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode} in {cwd}:\n{out[-6000:]}"
    return proc.stdout


@pytest.mark.slow
def test_readme_toy_commands_work_as_written(tmp_path):
    repo = _copy_repo(tmp_path / "gaelle-ray")
    out = {}
    for command, shorten in COMMANDS:
        out[command] = _run(f"{command} {shorten}".strip(), repo)

    # the data, where the README says
    assert (repo / "runs/toy/raw/annotations/instances_val.json").is_file()
    counts = json.loads((repo / "runs/toy/shards/manifest.json").read_text())["counts"]
    assert counts["train"]["rows"] == 128 and counts["val"]["rows"] == 64

    # config show prints the validated config with the override (its paths are all URIs)
    shown = out[COMMANDS[2][0]]
    assert re.search(r"base_lr: 0\.3\b", shown) and "run_dir: s3://bucket/runs/gaelle-coco2017-400ep" in shown

    # pretraining wrote its run where the README's later commands look for it
    run = repo / "runs/cpu_demo"
    assert (run / "train/epoch_00001").is_dir()
    assert (run / "mlflow.db").is_file()  # the README's `mlflow ui --backend-store-uri sqlite:///$(pwd)/runs/cpu_demo/mlflow.db`
    assert not list(Path(repo).glob("**/session_*/artifacts")), "a worker wrote under Ray's session directory"

    # the probe of that checkpoint on the README's toy set: no false leakage alarm, an mAP
    probe = out[COMMANDS[4][0]]
    assert re.search(r"fast: final test mAP \d+\.\d+", probe), probe

    # attention maps of the make-toy images
    assert len(list((repo / "runs/attention").glob("*.png"))) >= 4

    # the sweep: three trials, the collapsed one flagged, the best config ready to run;
    # --resume reruns nothing and reports the same parent run
    first, again = out[COMMANDS[7][0]], out[COMMANDS[8][0]]
    _check_sweep(repo, first, again)


def _check_sweep(repo: Path, first: str, again: str) -> None:
    trials = re.findall(r"^  (\{.*\}): (.*)$", first, re.M)
    assert len(trials) == 3, first
    by_eps = {float(re.search(r"'loss\.epsilon': ([\d.e+-]+)", p).group(1)): state for p, state in trials}
    assert set(by_eps) == {0.05, 0.1, 1000.0}  # the third trial started: placement groups came back
    assert by_eps[1000.0] == "collapsed"  # uniform codes at ln K: stopped after its first epoch
    assert all(by_eps[e] != "collapsed" and not by_eps[e].startswith("error") for e in (0.05, 0.1))
    finished = {e: float(by_eps[e].split()[1]) for e in (0.05, 0.1) if by_eps[e].startswith("mAP")}
    assert finished and all(0.0 < m <= 1.0 for m in finished.values())
    best_map = float(re.search(r"best fast linear-probe mAP ([\d.]+); its config: (\S+)", first).group(1))
    best_config = Path(re.search(r"its config: (\S+)", first).group(1))
    assert best_map == pytest.approx(max(finished.values()), abs=1e-4)
    assert best_config.is_file() and str(best_config).startswith(str(repo.resolve()))

    from gaelle_ray.config import load_config
    best = load_config(best_config)  # ready to run
    assert best.loss.epsilon == max(finished, key=finished.get)
    assert best.data.shards == str((repo / "runs/toy_tiny/shards").resolve())

    parent_id, uri = re.search(r"MLflow parent run (\S+) in (\S+)", first).groups()
    assert re.search(r"MLflow parent run (\S+) in", again).group(1) == parent_id
    assert re.search(r"best fast linear-probe mAP ([\d.]+)", again).group(1) == f"{best_map:.4f}"

    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    pretrain_runs = [r for r in children if r.data.tags.get("job") == "pretrain"]
    assert len(pretrain_runs) == 3  # the resumed sweep reran nothing
    assert sorted(float(r.data.params["loss.epsilon"]) for r in pretrain_runs) == [0.05, 0.1, 1000.0]
    assert any("map" in r.data.metrics for r in pretrain_runs)
    for r in pretrain_runs:  # ASHA ranked them on the online k-NN mAP, reported with every epoch
        if float(r.data.params["loss.epsilon"]) != 1000.0:
            assert 0.0 < r.data.metrics["epoch_online_map"] <= 1.0
    assert "best_map" in parent.data.metrics
