"""`gaelle demo`: the whole system on a laptop, no GPU, no download.

toy set (COCO format) -> Parquet shards -> local Ray instance -> GAELLE pretraining of
experiments/cpu_demo.yaml on Ray Train (MLflow run) -> fast linear probe on the pretrained
backbone and on the same architecture at random initialisation -> a table with both mAPs,
the margin and the time taken, and the command that opens the MLflow UI.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from gaelle_ray.config import Config, load_config

CPU_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "cpu_demo.yaml"


@dataclass
class DemoResult:
    map_pretrained: float
    map_random: float
    seconds: dict[str, float]
    tracking_uri: str
    checkpoint: str
    online: dict[str, float] = field(default_factory=dict)  # online metrics at the end of pretraining
    run_id: str = ""  # the pretraining run in MLflow

    @property
    def margin(self) -> float:
        return self.map_pretrained - self.map_random


def demo_config(out_dir: Path, overrides: list[str]) -> Config:
    shards = out_dir / "shards"
    return load_config(CPU_CONFIG, [f"data.shards={shards}", f"eval.data={shards}",
                                    f"train.run_dir={out_dir / 'run'}", *overrides])


def run_demo(out_dir: str | Path = "runs/demo", *, n_train: int = 2000, n_val: int = 500, image_size: int = 128,
             overrides: list[str] = (), fresh: bool = True) -> DemoResult:
    """Run the demo under `out_dir`; `overrides` are config `key=value` strings (the tests
    shorten the run with them). fresh: remove a previous demo run first."""
    from gaelle_ray.data.prepare import prepare_toy
    from gaelle_ray.eval.linear import run_linear_eval
    from gaelle_ray.train.trainer import pretrain

    out_dir = Path(out_dir).resolve()
    if fresh and (out_dir / "run").exists():
        shutil.rmtree(out_dir / "run")
    config = demo_config(out_dir, list(overrides))
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    prepare_toy(str(out_dir / "shards"), n_train=n_train, n_val=n_val, image_size=image_size, seed=0, workers=2)
    seconds["data"] = time.perf_counter() - t0
    print(f"[demo] toy set: {n_train} train / {n_val} val images of {image_size} px as shards in {out_dir / 'shards'} "
          f"({seconds['data']:.0f}s)", flush=True)

    t0 = time.perf_counter()
    workers = config.train.num_workers
    print(f"[demo] pretraining {config.model.arch} for {config.train.epochs} epochs on {workers} Ray Train "
          f"worker{'s' if workers != 1 else ''} of {config.ray.num_cpus_per_worker:g} CPU(s)...", flush=True)
    result = pretrain(config, config_file=CPU_CONFIG, overrides=list(overrides))
    seconds["pretrain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = {}
    for name, checkpoint in (("pretrained", result.checkpoint), ("random init", "random")):
        ev = run_linear_eval(checkpoint, "toy", str(out_dir / "shards"), config, fast=True,
                             parent_run_id=result.mlflow_run_id, cache_dir=out_dir / "cache")
        scores[name] = float(ev["map_final"])
    seconds["probe"] = time.perf_counter() - t0
    online = {k: v for k, v in result.metrics.items() if k.startswith("online_")}
    demo = DemoResult(scores["pretrained"], scores["random init"], seconds, result.tracking_uri, result.checkpoint,
                      online, result.mlflow_run_id)
    print_table(demo)
    return demo


def print_table(demo: DemoResult) -> None:
    total = sum(demo.seconds.values())
    rows = [("backbone", "fast linear-probe mAP (toy val)"),
            ("GAELLE pretrained", f"{100 * demo.map_pretrained:.1f}"),
            ("random init", f"{100 * demo.map_random:.1f}"),
            ("margin", f"{100 * demo.margin:+.1f} points")]
    for key, label in (("online_map", "online k-NN mAP"), ("online_linear_map", "online linear mAP")):
        base, end = demo.online.get(f"{key}_baseline"), demo.online.get(key)
        if base is not None and end is not None:
            rows.append((label, f"{100 * base:.1f} at random init -> {100 * end:.1f} after pretraining "
                                f"({100 * (end - base):+.1f}, val split)"))
    width = max(len(r[0]) for r in rows) + 2
    print()
    for left, right in rows:
        print(f"  {left:<{width}}{right}")
    print(f"\n  time: data {demo.seconds['data']:.0f}s, pretraining {demo.seconds['pretrain']:.0f}s, "
          f"probes {demo.seconds['probe']:.0f}s, total {total / 60:.1f} min")
    print(f"  checkpoint: {demo.checkpoint}")
    print(f"  MLflow store: {demo.tracking_uri}")
    if demo.run_id:
        from gaelle_ray.tracking import ui_hint
        print("  " + ui_hint(demo.tracking_uri, demo.run_id) + "\n", flush=True)
    else:
        print(f"  open the MLflow UI with: mlflow ui --backend-store-uri {demo.tracking_uri}\n", flush=True)
