"""The `gaelle` command.

Each subcommand parses its arguments here and calls one library function; heavy imports
(torch, Ray) happen inside the handlers so `gaelle --help` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Sequence

from gaelle_ray.config import ConfigError, dump_yaml, load_config

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.base_lr=0.3 (repeatable)")


def _config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    sys.stdout.write(dump_yaml(config))
    return 0


def _make_toy(args: argparse.Namespace) -> int:
    from gaelle_ray.data.toy import make_toy

    summary = make_toy(args.out, n_train=args.n_train, n_val=args.n_val, image_size=args.image_size,
                       seed=args.seed, workers=args.workers)
    counts = ", ".join(f"{split}: {info['images']} images" for split, info in summary["splits"].items())
    print(f"toy set in {summary['out_dir']} ({counts}; {len(summary['class_names'])} classes)")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from gaelle_ray.data.prepare import prepare_from_source

    if args.kind != "toy" and not args.root:
        raise ValueError(f"gaelle prepare {args.kind} needs --root (the downloaded data set)")
    manifest = prepare_from_source(
        args.kind, args.out, root=args.root, year=args.year, splits=args.splits, dataset_name=args.name,
        shard_size=args.shard_size, min_size=args.min_size, strict=args.strict, workers=args.workers,
        n_train=args.n_train, n_val=args.n_val, image_size=args.image_size, seed=args.seed)
    for split, counts in manifest["counts"].items():
        print(f"{split}: {counts}")
    skipped = manifest.get("skipped", [])
    if skipped:
        print(f"{len(skipped)} records skipped (listed with reasons in the manifest), e.g.:")
        for item in skipped[:5]:
            print(f"  {item['file']}: {item['reason']}")
    print(f"shards and manifest.json written to {args.out}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.gpu:
        overrides.append("train.use_gpu=true")
    if args.cpu:
        overrides.append("train.use_gpu=false")
    if args.address is not None:
        overrides.append(f"ray.address={args.address}")
    config = load_config(args.config, overrides)

    from gaelle_ray.train.trainer import PretrainStopped, pretrain

    try:
        result = pretrain(config, resume=args.resume, address=config.ray.address, config_file=args.config,
                          overrides=overrides)
    except PretrainStopped as exc:
        print(f"gaelle pretrain: {exc}", file=sys.stderr)
        return 3
    print(f"pretraining finished: newest checkpoint {result.checkpoint}")
    print(f"MLflow run {result.mlflow_run_id} in {result.tracking_uri}")
    from gaelle_ray.tracking import ui_hint
    print(ui_hint(result.tracking_uri, result.mlflow_run_id))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from gaelle_ray.tune import load_sweep, run_sweep

    spec = load_sweep(args.config)
    from gaelle_ray.preflight import check_location, check_pretrain_inputs
    check_pretrain_inputs(spec.base)
    check_location(spec.storage, f"{args.config}: storage")
    result = run_sweep(spec, resume=args.resume, address=args.address or "")
    print(f"{len(result.trials)} trials:")
    for t in result.trials:
        state = "collapsed" if t["collapsed"] else ("error: " + t["error"] if t["error"] else f"mAP {t['map']:.4f}"
                                                    if t["map"] is not None else "stopped early")
        print(f"  {t['params']}: {state}")
    print(f"best fast linear-probe mAP {result.best_map:.4f}; its config: {result.best_config_path}")
    print(f"MLflow parent run {result.parent_run_id} in {result.tracking_uri}")
    from gaelle_ray.tracking import ui_hint
    print(ui_hint(result.tracking_uri, result.parent_run_id))
    failed = [t for t in result.trials if t["error"]]
    if failed:  # the best of the others is written, but a job runner must see that the sweep is incomplete
        print(f"gaelle sweep: {len(failed)} of {len(result.trials)} trials failed (above); "
              f"`gaelle sweep --config {args.config} --resume` runs them again", file=sys.stderr)
        return 1
    return 0


def _show_attention(args: argparse.Namespace) -> int:
    import os

    from gaelle_ray.preflight import InputError, check_checkpoint
    from gaelle_ray.viz import show_attention

    check_checkpoint(args.checkpoint)
    missing = [p for p in args.images if not os.path.exists(p)]
    if missing:
        raise InputError(f"--images: no such file or folder: {', '.join(missing)}")

    paths = show_attention(args.checkpoint, args.images, args.out, arch=args.arch, image_size=args.image_size)
    for path in paths:
        print(path)
    return 0


def _import_released(args: argparse.Namespace) -> int:
    from gaelle_ray.model.released import import_released

    result = import_released(args.file, args.heads, args.out, arch=args.arch)
    folder, model = result["folder"], result["config"].model
    print(f"checkpoint folder written: {folder} ({model.arch}, H = {model.nmb_groups_heads}, "
          f"d = {model.feat_dim}, K = {model.nmb_prototypes}, K_l = {model.nmb_local_prototypes}, "
          f"epoch {result['epoch'] if result['epoch'] is not None else '?'})")
    print(f"next: gaelle linear-eval --checkpoint {folder} --dataset coco --data SHARDS   "
          f"(also semisup, show-attention, or --set train.init_from={folder} for pretraining)")
    return 0


PROTOCOL = {"coco": {"eval.batch_size": 128, "eval.lr": 0.1}, "voc": {"eval.batch_size": 32, "eval.lr": 0.03}}


def _eval_config(args: argparse.Namespace):
    """The config an evaluation runs with: --config, else the checkpoint's own (meta.json),
    else the defaults; switching data set applies that data set's protocol batch size and lr."""
    from gaelle_ray.config import Config
    from gaelle_ray.eval.checkpoints import read_meta, resolve_checkpoint

    from gaelle_ray.preflight import check_checkpoint
    check_checkpoint(args.checkpoint)
    args.checkpoint = resolve_checkpoint(args.checkpoint)  # a run folder: its newest checkpoint
    if args.config:
        config = load_config(args.config)
    else:
        meta = read_meta(args.checkpoint) if args.checkpoint != "random" else None
        config = Config.from_dict(meta["config"], source=f"{args.checkpoint}/meta.json") if meta else Config()
    changes = {}
    if args.dataset and args.dataset != config.eval.dataset:
        changes = {"eval.dataset": args.dataset, **PROTOCOL.get(args.dataset, {})}
    from gaelle_ray.config import parse_override, with_absolute_paths
    changes.update(dict(parse_override(item) for item in args.overrides))
    return with_absolute_paths(config.replace(changes) if changes else config)


def _linear_eval(args: argparse.Namespace) -> int:
    from gaelle_ray.eval.linear import run_linear_eval

    config = _eval_config(args)
    _check_eval_data(args, config)
    result = run_linear_eval(args.checkpoint, args.dataset, args.data, config, fast=args.fast,
                             allow_overlap=args.allow_overlap or None, num_workers=args.num_workers)
    _print_eval(result)
    return 0


def _semisup(args: argparse.Namespace) -> int:
    from gaelle_ray.eval.semisup import run_semisup

    config = _eval_config(args)
    _check_eval_data(args, config)
    kwargs = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    result = run_semisup(args.checkpoint, args.percent, args.data, config, dataset=args.dataset,
                         allow_overlap=args.allow_overlap or None, seed=args.seed, **kwargs)
    _print_eval(result)
    return 0


def _check_eval_data(args: argparse.Namespace, config) -> None:
    """The evaluation shards and both of their splits, before anything starts; the console
    then without Ray's and MLflow's informational lines."""
    from gaelle_ray.preflight import check_shards
    from gaelle_ray.ray_setup import quiet_console

    key = "--data" if args.data else "eval.data"
    data = args.data or config.eval.data
    check_shards(data, key, config.eval.train_split)
    check_shards(data, key, config.eval.test_split)
    quiet_console()


def _print_eval(result: dict) -> None:
    for row in result.get("per_class", []):
        ap = row.get("ap_final")
        print(f"  {row['class']:<20} AP {'excluded' if ap is None or ap != ap else f'{100 * ap:.1f}'}")
    print(f"{result['mode']}: final test mAP {100 * result['map_final']:.2f} (last epoch), "
          f"best test mAP {100 * result['map_best']:.2f} (epoch {result['best_epoch']}, best over epochs)")
    if result.get("run_id"):
        print(f"MLflow run {result['run_id']}")


def _demo(args: argparse.Namespace) -> int:
    from gaelle_ray.demo import run_demo
    from gaelle_ray.preflight import check_location

    check_location(args.out, "--out")

    run_demo(args.out, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaelle", allow_abbrev=False,
        description="GAELLE self-supervised multi-label pretraining on Ray: data preparation, "
                    "distributed pretraining, evaluation and sweeps.")
    strict = functools.partial(argparse.ArgumentParser, allow_abbrev=False)  # --num-worker is not --num-workers
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=strict)

    config = sub.add_parser("config", help="inspect and validate experiment configs")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", parser_class=strict)
    show = config_sub.add_parser("show", help="print the resolved, validated config as YAML")
    _add_config_args(show)
    show.set_defaults(handler=_config_show)

    pre = sub.add_parser("pretrain", help="GAELLE pretraining on Ray Train (also the ray job submit entrypoint)")
    _add_config_args(pre)
    pre.add_argument("--address", help="Ray address: 'auto' for a running cluster, ray://host:port, "
                                       "or omit to start a local instance")
    pre.add_argument("--num-workers", type=int, help="training workers (overrides train.num_workers)")
    device = pre.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu=true)")
    device.add_argument("--cpu", action="store_true", help="CPU workers (train.use_gpu=false; train.precision applies on the CPU too)")
    pre.add_argument("--resume", action="store_true",
                     help="continue the run in train.run_dir from its newest checkpoint")
    pre.set_defaults(handler=_pretrain)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep over config keys (see experiments/sweeps/)")
    sweep.add_argument("--config", required=True, help="sweep YAML")
    sweep.add_argument("--address", help="Ray address ('auto', ray://...), or omit for a local instance")
    sweep.add_argument("--resume", action="store_true", help="continue a stopped sweep (finished trials are kept)")
    sweep.set_defaults(handler=_sweep)

    demo = sub.add_parser("demo", help="toy set -> pretraining on Ray -> linear probe vs random init (CPU, minutes)")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its data and run")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of experiments/cpu_demo.yaml")
    demo.set_defaults(handler=_demo)

    for name, helptext in (("linear-eval", "linear probe mAP of a frozen backbone (method.md section 7)"),
                           ("semisup", "fine-tune with 1%% or 10%% of the labels")):
        ev = sub.add_parser(name, help=helptext)
        ev.add_argument("--checkpoint", required=True,
                        help="checkpoint folder (epoch_NNNNN), run folder (its newest epoch), exported torchvision .pth, "
                             "released GAELLE/SwAV .pth, or 'random'")
        ev.add_argument("--dataset", choices=["coco", "voc", "toy"], help="evaluation data set (default eval.dataset)")
        ev.add_argument("--data", help="evaluation shards URI (default eval.data)")
        ev.add_argument("--config", help="config for the eval settings (default: the checkpoint's own)")
        ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        ev.add_argument("--allow-overlap", action="store_true",
                        help="evaluate even if the test images were in the pretraining data (tagged in MLflow)")
        if name == "linear-eval":
            ev.add_argument("--fast", action="store_true", help="classifier on cached centre-crop features (proxy)")
            ev.add_argument("--num-workers", type=int, help="Ray Train workers for the full protocol")
            ev.set_defaults(handler=_linear_eval)
        else:
            ev.add_argument("--percent", type=float, required=True, choices=[1.0, 10.0])
            ev.add_argument("--epochs", type=int, help="default 20")
            ev.add_argument("--batch-size", type=int, help="default 32")
            ev.add_argument("--seed", type=int, default=0, help="fixes the label subset")
            ev.set_defaults(handler=_semisup)

    att = sub.add_parser("show-attention", help="draw the semantic attention of each head group over images")
    att.add_argument("--checkpoint", required=True,
                     help="checkpoint folder (epoch_NNNNN), run folder (newest epoch), or released .pth")
    att.add_argument("--images", required=True, nargs="+", help="image files or folders")
    att.add_argument("--out", required=True, help="output folder for the PNGs")
    att.add_argument("--arch", help="backbone (released checkpoints only; ours record it)")
    att.add_argument("--image-size", type=int, default=224, help="short side resize + centre crop")
    att.set_defaults(handler=_show_attention)

    imp = sub.add_parser("import-released", help="turn the authors' released .pth into a gaelle checkpoint folder")
    imp.add_argument("file", help="the released checkpoint (.pth / .pth.tar; method.md section 9)")
    imp.add_argument("--heads", type=int, required=True,
                     help="head groups H (model.nmb_groups_heads): not in the weights; 4 in the published runs, "
                          "8 is the released script's default; refused when the weights contradict it")
    imp.add_argument("--out", required=True, help="checkpoint folder to write (new or empty)")
    imp.add_argument("--arch", help="backbone (default: read from the weights; checked when given)")
    imp.set_defaults(handler=_import_released)

    toy = sub.add_parser("make-toy", help="write the demo multi-object image set in COCO format")
    toy.add_argument("--out", required=True, help="output folder")
    _add_toy_args(toy)
    toy.set_defaults(handler=_make_toy)

    prep = sub.add_parser("prepare", help="turn a data set into Parquet shards + manifest.json")
    prep.add_argument("kind", choices=["coco", "voc", "folder", "toy"])
    prep.add_argument("--root", help="data set root (coco: folder with annotations/ and train2017/...; "
                                     "voc: VOC2007 or VOCdevkit; folder: any image folder)")
    prep.add_argument("--out", required=True, help="output folder or URI (s3://, gs://, file://)")
    prep.add_argument("--year", type=int, default=2017, choices=[2014, 2017], help="COCO year")
    prep.add_argument("--splits", nargs="+", help="splits to read (default: coco train val, voc trainval test)")
    prep.add_argument("--name", help="data set name recorded in the manifest")
    prep.add_argument("--shard-size", type=int, default=1000, help="images per Parquet shard")
    prep.add_argument("--min-size", type=int, default=0,
                      help="skip images whose short side is smaller (e.g. the largest crop)")
    prep.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    _add_toy_args(prep)
    prep.set_defaults(handler=_prepare)
    return parser


def _add_toy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-train", type=int, default=2000, help="toy: training images")
    p.add_argument("--n-val", type=int, default=500, help="toy: validation images")
    p.add_argument("--image-size", type=int, default=128, help="toy: image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="toy: seed")
    p.add_argument("--workers", type=int, default=1, help="processes")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"gaelle {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
