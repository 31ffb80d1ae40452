"""The `gaelle` console script."""

import shutil
import subprocess
import sys
from pathlib import Path

from gaelle_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
CPU = str(ROOT / "experiments" / "cpu_demo.yaml")


def test_console_script_help_and_config_show():
    exe = shutil.which("gaelle") or str(Path(sys.executable).parent / "gaelle")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "config" in out
    out = subprocess.run([exe, "config", "show", "--config", CPU, "--set", "optim.base_lr=0.25"],
                         capture_output=True, text=True, check=True).stdout
    assert "base_lr: 0.25" in out and "arch: resnet18" in out


def test_config_show_reports_errors_with_key_and_file(capsys):
    assert main(["config", "show", "--config", CPU, "--set", "model.nmb_groups_heads=3"]) == 2
    err = capsys.readouterr().err
    assert "cpu_demo.yaml" in err and "model.nmb_groups_heads" in err
