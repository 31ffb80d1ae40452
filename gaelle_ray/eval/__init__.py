"""Downstream evaluation (method.md section 7): mAP, checkpoint loading, the SS-PRL linear
probe (full protocol, distributed on Ray Train, and a cached-feature fast proxy), the
leakage guard, and semi-supervised fine-tuning.

    metrics.py      mAP (the SS-PRL definition)
    checkpoints.py  backbones from every kind of checkpoint, pretraining provenance
    features.py     evaluation images from shards, frozen-backbone features and their cache
    leakage.py      test images must not be pretraining images
    probe.py        the probe core: settings, result, classifier, loss, training loop
    linear.py       linear probe in one process (full and fast) and `gaelle linear-eval`
    distributed.py  the full linear probe on Ray Train workers
    semisup.py      fine-tuning on 1% / 10% of the labels and `gaelle semisup`
    report.py       an evaluation's MLflow run

Nothing here imports Ray at module level except gaelle_ray.eval.distributed.
"""

from gaelle_ray.eval.checkpoints import load_backbone, pretraining_manifest_of
from gaelle_ray.eval.leakage import check_overlap
from gaelle_ray.eval.linear import fast_linear_probe, linear_probe, run_linear_eval
from gaelle_ray.eval.metrics import average_precision, mean_average_precision
from gaelle_ray.eval.semisup import run_semisup

__all__ = [
    "average_precision", "check_overlap", "fast_linear_probe", "linear_probe", "load_backbone",
    "mean_average_precision", "pretraining_manifest_of", "run_linear_eval", "run_semisup",
]
