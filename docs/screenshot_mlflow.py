"""Screenshot of the MLflow UI's runs table for a demo store, as a user opens it.

    python docs/screenshot_mlflow.py runs/demo/run/mlflow.db docs/img/mlflow_runs.png

Starts `mlflow server` on a free loopback port against the sqlite store, opens the URL that
`gaelle demo` prints (the experiment's runs, "Model training" view, the mAP columns) in
headless Chromium (`apt-get install chromium`; not needed by the tests), writes the PNG and
stops the server. Used to make the picture in the README; nothing else depends on it.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="the sqlite MLflow store (mlflow.db)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--experiment", default="gaelle-cpu-demo")
    parser.add_argument("--size", default="1500,560", help="window width,height in pixels")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from gaelle_ray import tracking

    uri = f"sqlite:///{Path(args.store).resolve()}"
    experiment = MlflowClient(uri).get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"{args.store}: no experiment {args.experiment!r}")
    tracking.mark_experiment(uri, experiment.experiment_id)  # the kind tag and the runs-table view
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as artifacts:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
             "--default-artifact-root", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(f"{base}/health")
            url = tracking.ui_url(base, experiment.experiment_id)
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={args.size}", "--virtual-time-budget=20000",
                            f"--screenshot={Path(args.out).resolve()}", url],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{args.out}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
