"""What the online evaluation costs against the pretraining it watches, on this machine.

    python benchmarks/online_eval.py                    # the COCO 2017 config (ResNet-50)
    python benchmarks/online_eval.py --config experiments/cpu_demo.yaml --train-images 2000

Measured in one run, same process, same threads:
- a training step of the config (GaelleStepper: 2 x 224 + 6 x 96 crops for COCO, forward,
  losses, backward, LARC step) at --batch images per worker: seconds per image trained;
- the online probe's work per evaluation image: JPEG decode + resize + centre crop of a
  real JPEG of --jpeg-size pixels (what a worker does when its images do not fit in
  eval.online_cache_mb), and the backbone's forward in eval mode at eval.image_size;
- the k-NN scoring of the queries against the bank (feature-sized random vectors).

Scaled by the split sizes of the config (bank eval.online_bank_images, queries
eval.online_query_images or --query-images, an epoch of --train-images): one evaluation as a
share of one epoch, and per epoch when it runs every eval.online_every_epochs epochs. Both
sides scale the same way with the number of workers, so the shares hold for any W.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gaelle_ray.config import load_config
from gaelle_ray.eval.features import EvalTransform
from gaelle_ray.eval.online import knn_multilabel
from gaelle_ray.model import build_model
from gaelle_ray.train.step import GaelleStepper

ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _jpeg(size: tuple[int, int]) -> bytes:
    """A photo-like JPEG (smooth gradients and noise) of `size` (W, H)."""
    w, h = size
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) * 127 / (w + h))], -1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments" / "coco2017_400ep.yaml"))
    parser.add_argument("--batch", type=int, default=4, help="training images per worker for the timed step")
    parser.add_argument("--train-images", type=int, default=118287, help="images per pretraining epoch")
    parser.add_argument("--query-images", type=int, default=5000, help="queries when the config says 0 (all)")
    parser.add_argument("--jpeg-size", default="640x480")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, ["train.use_gpu=false", "train.precision=fp32",
                                       f"train.batch_size_per_worker={args.batch}", "queue.queue_length=0"])
    ev = config.eval
    bank = ev.online_bank_images
    queries = ev.online_query_images or args.query_images
    every = max(ev.online_every_epochs, 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config {args.config}: "
          f"{config.model.arch}, crops {list(config.augmentation.nmb_crops)} x {list(config.augmentation.size_crops)} px, "
          f"eval at {ev.image_size} px; bank {bank}, queries {queries}, every {every} epochs; epoch {args.train_images} images")

    torch.manual_seed(0)
    model = build_model(config).train()
    stepper = GaelleStepper(model, config, torch.device("cpu"), iters_per_epoch=1000)
    aug = config.augmentation
    crops = [torch.randint(0, 256, (n * args.batch, 3, s, s), dtype=torch.uint8)
             for s, n in zip(aug.size_crops, aug.nmb_crops)]
    t_step = _median_time(lambda: stepper.step(crops, 0, config.train.epochs), args.reps)
    per_train_image = t_step / args.batch

    backbone = model.backbone
    x = torch.randn(16, 3, ev.image_size, ev.image_size)

    def forward():
        backbone.eval()
        with torch.no_grad():
            backbone(x)
        backbone.train()

    per_feature = _median_time(forward, args.reps) / len(x)
    w, h = (int(v) for v in args.jpeg_size.split("x"))
    data = _jpeg((w, h))
    transform = EvalTransform(False, ev.image_size, ev.resize_size).build()

    def decode():
        for _ in range(16):
            with Image.open(io.BytesIO(data)) as im:
                transform(im.convert("RGB"))

    per_decode = _median_time(decode, args.reps) / 16
    dim = backbone.num_features
    g = torch.Generator().manual_seed(0)
    bank_f, query_f = torch.randn(bank, dim, generator=g), torch.randn(queries, dim, generator=g)
    labels = (torch.rand(bank, 80, generator=g) < 0.04).to(torch.uint8)
    t_knn = _median_time(lambda: knn_multilabel(bank_f, labels, query_f, ev.online_knn_k, ev.online_knn_temperature),
                         max(1, args.reps // 2))

    epoch = args.train_images * per_train_image
    cached = (bank + queries) * per_feature + t_knn
    uncached = (bank + queries) * (per_feature + per_decode) + t_knn
    print(f"training step: {t_step:.3f}s for {args.batch} images = {1e3 * per_train_image:.1f} ms/image; "
          f"epoch of {args.train_images} images = {epoch / 3600:.2f} h on this machine")
    print(f"online probe: forward {1e3 * per_feature:.2f} ms/image, decode+resize+crop of a {w}x{h} JPEG "
          f"{1e3 * per_decode:.2f} ms/image, k-NN of {queries} x {bank} {t_knn:.2f}s")
    for name, cost in (("images decoded again", uncached), ("images kept in memory", cached)):
        print(f"one evaluation ({name}): {cost / 60:.1f} min = {100 * cost / epoch:.2f}% of an epoch; "
              f"every {every} epochs: {100 * cost / (every * epoch):.2f}% per epoch")
    print(f"share of an epoch, one evaluation, decoding included: {100 * uncached / epoch:.2f}% "
          "(target at the COCO config's sizes: <= 5%)")


if __name__ == "__main__":
    main()
