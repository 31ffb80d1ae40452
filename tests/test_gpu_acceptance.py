"""benchmarks/gpu_acceptance.py as a user runs it: without CUDA it says so and exits 0, and
`--device cpu --smoke` runs every row's code on the CPU (tiny shapes; its own local Ray
instance on 127.0.0.1 for the stream row) and prints the table."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the check")
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = _run(timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stdout


def _module(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_acceptance", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_failed_tolerance_or_a_row_that_raises_exits_non_zero(monkeypatch, capsys):
    ga = _module(monkeypatch)
    threads = torch.get_num_threads()  # main() sets one thread for a CPU run
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert ga.tol_row("x", "m", 0.5, 1.0).result == "PASS"
    assert ga.tol_row("x", "m", 2.0, 1.0).result == "FAIL"
    assert ga.tol_row("x", "m", float("nan"), 1.0).result == "FAIL"
    monkeypatch.setattr(ga, "row_exact", lambda plan, device, state: [ga.tol_row("exact", "m", 2.0, 1.0)])
    assert ga.main(["--device", "cpu", "--smoke", "--rows", "exact"]) == 1
    assert "FAIL" in capsys.readouterr().out

    def boom(plan, device, state):
        raise RuntimeError("broken row")

    monkeypatch.setattr(ga, "row_exact", boom)
    assert ga.main(["--device", "cpu", "--smoke", "--rows", "exact"]) == 1
    out = capsys.readouterr().out
    assert "error: RuntimeError: broken row" in out and "FAIL" in out
    monkeypatch.setattr(ga, "row_exact", lambda plan, device, state: [ga.tol_row("exact", "m", 0.5, 1.0)])
    assert ga.main(["--device", "cpu", "--smoke", "--rows", "exact"]) == 0
    assert torch.get_num_threads() == threads


def test_cpu_needs_smoke():
    proc = _run("--device", "cpu", timeout=120)
    assert proc.returncode == 2 and "--smoke" in proc.stderr


@pytest.mark.slow
def test_cpu_smoke_prints_every_row_and_passes():
    proc = _run("--device", "cpu", "--smoke", timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL", "info"))
            or "skipped (needs" in line]
    expected = {  # start of the check: (result, rows)
        "float64 cpu vs float64 cpu: ": ("PASS", 3),
        "fp32 cpu vs float64 cpu: ": ("PASS", 3),
        "2 x 4 gloo vs 1 x 8 (float64): ": ("PASS", 3),
        "bf16 matmul": ("info", 1),
        "step model FLOPs": ("info", 1),
        "step, compile off": ("info", 1),
        "step, compile on (aot_eager": ("info", 1),
        "colour cpu batched vs cpu path": ("PASS", 2),
        "Ray Data stream alone": ("info", 1),
        "eager step fed by the stream": ("info", 1),
    }
    for start, (result, count) in expected.items():
        found = [r for r in rows if r.startswith(start)]
        assert len(found) == count, (start, found, out)
        assert all(r.rstrip().endswith(result) for r in found), (start, found)
    assert "FAIL" not in out
    assert "MFU" in out and "data wait" in out and "grey level" in out
    assert out.splitlines()[-1].startswith("11 passed, 0 failed, 6 measurements, 0 skipped")
