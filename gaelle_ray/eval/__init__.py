"""Downstream evaluation (method.md section 7): mAP, checkpoint loading, the SS-PRL linear
probe (full protocol, distributed on Ray Train, and a cached-feature fast proxy), the
leakage guard, and semi-supervised fine-tuning.

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
