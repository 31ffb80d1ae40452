"""One validated config tree for every gaelle-ray job.

A config is a YAML file with up to ten sections (data, augmentation, model, loss,
optim, queue, train, eval, ray, tracking); every key it leaves out takes the default
below. `load_config(path, overrides)` reads it, applies `--set a.b=value` overrides,
checks every key and value once, and returns a frozen `Config`. Nothing runs on a config
that fails: every error is a `ConfigError` naming the file and the dotted key.

At the Ray boundary the tree travels as a plain dict (`config.to_dict()`), and comes back
with `Config.from_dict(d)`, validated again.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config that must not run; the message names the file and the key."""


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Where the pretraining images come from and how the stream reads them."""

    shards: str = "runs/toy/shards"  # URI of `gaelle prepare` output (local path, s3://, gs://)
    split: str = "train"  # which split of the shards to pretrain on
    max_images: int = 0  # use only the first N images of the split (0 = all)
    read_parallelism: int = 0  # Ray Data read tasks (0 = let Ray decide)
    crop_cpus: float = 1.0  # CPUs reserved by each crop task of the stream
    prefetch_batches: int = 2  # batches prefetched per training worker
    # Ray Data's preserve_order for the training stream: batches reach the workers in the
    # same order on every run, so a resumed run repeats an uninterrupted one exactly; costs
    # head-of-line blocking (a finished crop task waits for slower ones before it)
    preserve_order: bool = False
    # a shard that cannot be read during the run (deleted, truncated or changed after `gaelle
    # prepare`): stop = the run stops at once, naming the shard, and keeps its checkpoints (fix
    # the data, then --resume); skip = its rows are dropped with an error line naming it, and
    # a (re)start leaves unreadable shards out of the epoch
    bad_shard_action: str = "stop"


MEAN = (0.485, 0.456, 0.406)  # per-channel normalisation of the crops (augmentation.mean default)
STD = (0.228, 0.224, 0.225)  # 0.228, not ImageNet's 0.229: what the published runs used

_AUG_LISTS = ("size_crops", "nmb_crops", "min_scale_crops", "max_scale_crops", "ratio",
              "blur_sigma", "mean", "std")
_AUG_LENGTHS = {"ratio": 2, "blur_sigma": 2, "mean": 3, "std": 3}
_AUG_INTS = ("size_crops", "nmb_crops")
_AUG_NUMBERS = ("min_scale_crops", "max_scale_crops", "ratio", "blur_sigma", "mean", "std")
_AUG_SCALARS = ("jitter_p", "brightness", "contrast", "saturation", "hue", "grayscale_p", "blur_p")


@dataclass(frozen=True)
class AugmentationConfig:
    """Multi-crop views of method.md section 1: the one home of their settings and checks.

    Crops, per resolution r (the four crop lists have one entry per resolution, the first
    being the global crops): ``nmb_crops[r]`` crops of ``size_crops[r]`` pixels, each covering
    a fraction of the image area uniform in ``[min_scale_crops[r], max_scale_crops[r]]`` with
    aspect ratio (w/h) log-uniform in ``ratio``, flipped with probability 0.5.
    Colour, per crop: with probability ``jitter_p`` the four jitter ops in a random order
    (brightness, contrast, saturation: factor uniform in ``[max(0, 1 - s), 1 + s]``; hue:
    shift uniform in ``[-hue, hue]`` turns), grayscale with ``grayscale_p``, Gaussian blur
    with ``blur_p`` and sigma uniform in ``blur_sigma``, then normalise with ``mean`` / ``std``.

    Every value is checked on construction: ValueError naming the key
    (``augmentation.<name>: ...``). Lists are stored as tuples (hashable, immutable).
    """

    size_crops: tuple[int, ...] = (224, 96)
    nmb_crops: tuple[int, ...] = (2, 6)
    min_scale_crops: tuple[float, ...] = (0.14, 0.05)
    max_scale_crops: tuple[float, ...] = (1.0, 0.14)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    colour_on_device: bool = True  # colour ops on the training worker's device, else in the stream
    compile_cpu_colour: bool = True  # colour ops on a CPU run as torch.compile'd kernels

    def __post_init__(self) -> None:
        for name in _AUG_LISTS:
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                _aug_fail(name, f"must be a list, got {value!r}")
            value = tuple(value)
            if name in _AUG_LENGTHS and len(value) != _AUG_LENGTHS[name]:
                _aug_fail(name, f"expected a list of {_AUG_LENGTHS[name]} values, got {list(value)!r}")
            for i, item in enumerate(value):
                if name in _AUG_INTS and (isinstance(item, bool) or not isinstance(item, numbers.Integral)):
                    _aug_fail(f"{name}[{i}]", f"expected an integer, got {item!r}")
                if name in _AUG_NUMBERS and not _is_number(item):
                    _aug_fail(f"{name}[{i}]", f"expected a number, got {item!r}")
            if name in _AUG_NUMBERS:
                value = tuple(float(v) for v in value)
            object.__setattr__(self, name, value)
        for name in _AUG_SCALARS:
            if not _is_number(getattr(self, name)):
                _aug_fail(name, f"expected a number, got {getattr(self, name)!r}")
        for name in ("colour_on_device", "compile_cpu_colour"):
            if not isinstance(getattr(self, name), bool):
                _aug_fail(name, f"expected true or false, got {getattr(self, name)!r}")
        self._check_crops()
        self._check_colour()

    def _check_crops(self) -> None:
        lists = ("size_crops", "nmb_crops", "min_scale_crops", "max_scale_crops")
        lengths = {name: len(getattr(self, name)) for name in lists}
        if len(set(lengths.values())) != 1:
            _aug_fail("size_crops", "size_crops, nmb_crops, min_scale_crops and max_scale_crops "
                      f"must have the same length, got {lengths}")
        if lengths["size_crops"] == 0:
            _aug_fail("size_crops", "needs at least one crop resolution")
        for name in lists:
            value = getattr(self, name)
            if min(value) <= 0:
                _aug_fail(name, f"must be > 0, got {list(value)!r}")
        for i, (lo, hi) in enumerate(zip(self.min_scale_crops, self.max_scale_crops)):
            if hi > 1.0:
                _aug_fail("max_scale_crops", f"[{i}] must be <= 1, got {hi}")
            if lo > hi:
                _aug_fail("min_scale_crops", f"[{i}] = {lo} is larger than max_scale_crops[{i}] = {hi}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            _aug_fail("ratio", f"must be 0 < low <= high, got {list(self.ratio)}")
        for i in range(1, len(self.size_crops)):
            if self.size_crops[i] == self.size_crops[i - 1]:
                _aug_fail("size_crops", f"[{i - 1}] and [{i}] are both {self.size_crops[i]} px: the crops of one "
                          "size are one resolution (one tensor, one backbone call; GaelleModel.forward refuses "
                          "two neighbouring tensors of one size); use one entry for them")

    def _check_colour(self) -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _aug_fail(name, f"must be a probability in [0, 1], got {getattr(self, name)!r}")
        for name in ("brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                _aug_fail(name, f"must be >= 0, got {getattr(self, name)!r}")
        if self.hue > 0.5:
            _aug_fail("hue", f"must be <= 0.5, got {self.hue}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            _aug_fail("blur_sigma", f"must be 0 < low <= high, got {list(self.blur_sigma)}")
        if min(self.std) <= 0:
            _aug_fail("std", f"must be > 0, got {list(self.std)!r}")

    @property
    def num_crops(self) -> int:
        """V: crops per image, all resolutions together (what the stream makes and the losses
        expect)."""
        return int(sum(self.nmb_crops))

    @property
    def num_global_crops(self) -> int:
        """Vg: crops of the first resolution, the global crops."""
        return int(self.nmb_crops[0])

    def crop_sizes(self) -> list[int]:
        """Output size of every crop in order, e.g. [224, 224, 96, 96, 96, 96, 96, 96]."""
        return [int(s) for s, n in zip(self.size_crops, self.nmb_crops) for _ in range(n)]

    def crop_scales(self) -> list[tuple[float, float]]:
        """Area-fraction range (min, max) of every crop in order."""
        return [(lo, hi) for lo, hi, n in zip(self.min_scale_crops, self.max_scale_crops, self.nmb_crops)
                for _ in range(n)]


def _aug_fail(key: str, message: str) -> None:
    raise ValueError(f"augmentation.{key}: {message}")


def _is_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class ModelConfig:
    """The GAELLE network of method.md section 2."""

    arch: str = "resnet50"
    hidden_mlp: int = 2048  # hidden width of the global and local projection heads
    feat_dim: int = 128  # d
    nmb_prototypes: int = 3000  # K (global and local-to-global prototypes)
    nmb_local_prototypes: int = 3000  # K_l
    nmb_groups_heads: int = 4  # H; S = feat_dim / H local slots per image
    attention_temperature: float = 1.0
    sync_bn: bool = True  # synchronised BatchNorm when there is more than one worker


@dataclass(frozen=True)
class LossConfig:
    """Losses of method.md sections 3 and 4."""

    temperature: float = 0.1  # tau
    epsilon: float = 0.05  # Sinkhorn regularisation
    sinkhorn_iterations: int = 3
    crops_for_assign: tuple[int, ...] = (0, 1)
    local_shuffle: bool = True
    l2g_detach: bool = True
    weight_global: float = 1 / 3
    weight_local: float = 1 / 3
    weight_l2g: float = 1 / 3


@dataclass(frozen=True)
class OptimConfig:
    """LARC over SGD and the learning-rate schedule of method.md section 6."""

    base_lr: float = 0.6
    final_lr: float = 0.0006
    start_warmup: float = 0.0
    warmup_epochs: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    larc_trust_coefficient: float = 0.001
    freeze_prototypes_niters: int = 5005


@dataclass(frozen=True)
class QueueConfig:
    """Global and local embedding queues of method.md section 5."""

    queue_length: int = 3840  # total over all workers (0 = no queue)
    epoch_queue_starts: int = 7
    local_queue_length: int = 0  # rows of local embeddings, total over workers (0 = none)


@dataclass(frozen=True)
class TrainConfig:
    """The pretraining job."""

    epochs: int = 400
    batch_size_per_worker: int = 64
    num_workers: int = 2
    use_gpu: bool = True
    precision: str = "bf16"  # bf16 | fp16 (with a GradScaler) | fp32: autocast on CPU and CUDA alike
    compile: bool = False  # torch.compile the forward (wrapped in DDP with several workers)
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": graphs without code generation)
    channels_last: bool = True
    seed: int = 31
    run_dir: str = "runs/gaelle"  # local path or URI for checkpoints and the default MLflow store
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 3
    max_failures: int = 3
    log_every_steps: int = 50
    max_nonfinite_steps: int = 10
    collapse_window_epochs: int = 5
    collapse_action: str = "warn"  # warn | stop
    collapse_min_map_gain: float = 0.005  # online mAP this close to its baseline for the window: collapse
    # start from these weights instead of a random init: a checkpoint folder (epoch_NNNNN), a run
    # folder (its newest one), a folder `gaelle import-released` wrote, or a released .pth; the
    # whole model loads strictly, with a new optimiser and schedule (epoch 0, iteration 0).
    # Ignored when the run resumes from its own checkpoint. "" = random init.
    init_from: str = ""


@dataclass(frozen=True)
class EvalConfig:
    """Downstream evaluation of method.md section 7."""

    dataset: str = "coco"  # coco | voc | toy
    data: str = ""  # URI of the evaluation shards
    train_split: str = "train"
    test_split: str = "val"
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-6
    grad_clip: float = 10.0
    image_size: int = 224
    resize_size: int = 256
    num_workers: int = 1
    allow_overlap: bool = False
    precision: str = "fp32"  # the evaluation forwards (features, probes, fine-tuning): fp32 | bf16 | fp16
    # online evaluation during pretraining (a weighted k-NN multi-label probe on the pooled
    # backbone features, optionally also the fast linear probe on the same features)
    online_every_epochs: int = 0  # 0 = off; else every N epochs and once before the first step
    online_data: str = ""  # labelled shards ("" = eval.data, else data.shards)
    online_bank_split: str = ""  # the memory bank: a labelled subset of the training split ("" = eval.train_split)
    online_bank_images: int = 10000  # first N images of that split (0 = all)
    online_query_split: str = ""  # the queries: a held-out split, not pretrained on ("" = eval.test_split)
    online_query_images: int = 0  # first N images of that split (0 = all)
    online_knn_k: int = 20
    online_knn_temperature: float = 0.07
    online_linear: bool = False  # also the fast linear probe (eval.* settings) on the same features
    online_cache_mb: int = 1024  # per worker: decoded evaluation images kept in memory up to this size


@dataclass(frozen=True)
class RayConfig:
    """How the job reaches Ray."""

    address: str = ""  # "" = a new local instance, "auto" = a running cluster, or ray://...
    num_cpus_per_worker: float = 1.0
    storage_path: str = ""  # Ray Train storage ("" = train.run_dir)
    # the train workers' placement group (Ray's ScalingConfig.placement_strategy): PACK = as
    # few nodes as possible; SPREAD = on different nodes where they fit (a lost node then
    # takes fewer workers with it); STRICT_* = exactly so, or the workers wait for nodes
    placement_strategy: str = "PACK"


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow."""

    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    experiment: str = "gaelle"
    run_name: str = ""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # -- conversions ---------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), the form that crosses the Ray boundary."""
        return {
            f.name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<dict>") -> "Config":
        """Build and validate a config from a nested mapping (missing keys take defaults)."""
        return build_config(raw, source)

    def flat(self) -> dict[str, Any]:
        """{"section.key": value}, the form logged as MLflow params."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    def replace(self, overrides: Mapping[str, Any]) -> "Config":
        """A new validated config with dotted-key overrides applied."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value, "<overrides>")
        return build_config(raw, "<overrides>")

    # -- derived quantities ----------------------------------------------------------

    @property
    def num_slots(self) -> int:
        """S = d / H local slots per image."""
        return self.model.feat_dim // self.model.nmb_groups_heads

    @property
    def global_batch(self) -> int:
        return self.train.batch_size_per_worker * self.train.num_workers


_SECTION_TYPES = {
    "data": DataConfig,
    "augmentation": AugmentationConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "queue": QueueConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "ray": RayConfig,
    "tracking": TrackingConfig,
}

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
PRECISIONS = ("bf16", "fp16", "fp32")
EVAL_DATASETS = ("coco", "voc", "toy")
COLLAPSE_ACTIONS = ("warn", "stop")
BAD_SHARD_ACTIONS = ("stop", "skip")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------- loading


# config keys that hold a storage location: a relative local path in them means relative to
# the directory the command was run from, and is made absolute once, on the driver
PATH_KEYS = ("data.shards", "eval.data", "eval.online_data", "train.run_dir", "ray.storage_path", "train.init_from")
NULLABLE_KEYS = ("train.init_from",)  # YAML null (an empty `init_from:`) means ""


def with_absolute_paths(config: Config, base: str | Path | None = None) -> Config:
    """The config with every relative local path of PATH_KEYS made absolute against `base`
    (None: the current directory). URIs (s3://, file://, ...) and empty values are kept.
    Ray workers run in another directory, so the driver does this before anything starts."""
    base = os.path.abspath(os.fspath(base) if base is not None else os.getcwd())
    changes = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            changes[key] = os.path.normpath(os.path.join(base, value))
        elif value.startswith("~"):
            changes[key] = os.path.expanduser(value)
    return config.replace(changes) if changes else config


def load_config(path: str | Path, overrides: Sequence[str] = (), *, base: str | Path | None = None) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides, validate, return a Config.

    Relative local paths (PATH_KEYS) in the file or the overrides are made absolute against
    `base` (None: the current directory, where the command runs). Raises ConfigError naming
    the file (and the key) on any problem.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item, source)
        _set_dotted(raw, key, value, source)
    return with_absolute_paths(build_config(raw, source), base)


def parse_override(item: str, source: str = "<overrides>") -> tuple[str, Any]:
    """'a.b=value' -> ("a.b", parsed value); the value is read as YAML ('3' -> 3, '[1,2]')."""
    if "=" not in item:
        raise ConfigError(f"{source}: override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: override {item!r}: value is not valid YAML: {exc}") from None
    return key, value


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{source}: override key {key!r} must be section.key (e.g. optim.base_lr)")
    section, name = parts
    _check_known(section, list(_SECTION_TYPES), source, "section")
    fields = [f.name for f in dataclasses.fields(_SECTION_TYPES[section])]
    _check_known(name, fields, source, f"key in section {section!r}", prefix=f"{section}.")
    sect = raw.setdefault(section, {})
    if sect is None:
        sect = raw[section] = {}
    if not isinstance(sect, dict):
        raise ConfigError(f"{source}: {section}: must be a mapping, got {type(sect).__name__}")
    sect[name] = value


def _check_known(name: str, valid: list[str], source: str, what: str, prefix: str = "") -> None:
    if name in valid:
        return
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(valid)}"
    raise ConfigError(f"{source}: {prefix}{name}: unknown {what}{hint}")


def build_config(raw: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Nested mapping -> validated Config. `source` names the origin in error messages."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: config must be a mapping, got {type(raw).__name__}")
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        _check_known(str(section), list(_SECTION_TYPES), source, "section")
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: {section}: must be a mapping, got {type(values).__name__}")
        sections[section] = _build_section(section, _SECTION_TYPES[section], values, source)
    config = Config(**sections)
    validate(config, source)
    return config


def _build_section(name: str, cls: type, values: Mapping[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        _check_known(str(key), fields, source, f"key in section {name!r}", prefix=f"{name}.")
        if value is None and f"{name}.{key}" in NULLABLE_KEYS:
            value = ""
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}", source)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section that checks its own values (AugmentationConfig)
        raise ConfigError(f"{source}: {exc}") from None


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a field's type hint; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{source}: {key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key}: must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


# ----------------------------------------------------------------------------- validation


def validate(config: Config, source: str = "<config>") -> None:
    """Cross-field checks; raises ConfigError naming the key and the source."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    def positive(section: str, *names: str, allow_zero: bool = False) -> None:
        values = getattr(config, section)
        for name in names:
            v = getattr(values, name)
            items = v if isinstance(v, tuple) else (v,)
            for item in items:
                if item < 0 or (item == 0 and not allow_zero):
                    fail(f"{section}.{name}", f"must be {'>= 0' if allow_zero else '> 0'}, got {_plain(v)!r}")

    aug, model, loss, optim, queue, train = (
        config.augmentation, config.model, config.loss, config.optim, config.queue, config.train)

    # augmentation: AugmentationConfig checks its own values when built; its global-crop
    # count is checked with the loss below

    # model
    if model.arch not in ARCHS:
        fail("model.arch", f"unknown backbone {model.arch!r}; choose one of {', '.join(ARCHS)}")
    positive("model", "hidden_mlp", "feat_dim", "nmb_prototypes", "nmb_local_prototypes",
             "nmb_groups_heads", "attention_temperature")
    if model.feat_dim % model.nmb_groups_heads:
        fail("model.nmb_groups_heads", f"feat_dim d = {model.feat_dim} is not divisible by "
             f"nmb_groups_heads H = {model.nmb_groups_heads}")

    # loss
    positive("loss", "temperature", "epsilon", "sinkhorn_iterations")
    positive("loss", "weight_global", "weight_local", "weight_l2g", allow_zero=True)
    if loss.weight_global + loss.weight_local + loss.weight_l2g <= 0:
        fail("loss.weight_global", "at least one loss weight must be > 0")
    n_global = aug.num_global_crops
    if n_global < 2:
        fail("augmentation.nmb_crops", f"needs at least 2 global crops (nmb_crops[0]) for the swapped "
             f"and local losses, got {n_global}")
    if not loss.crops_for_assign:
        fail("loss.crops_for_assign", "needs at least one crop")
    if len(set(loss.crops_for_assign)) != len(loss.crops_for_assign):
        fail("loss.crops_for_assign", f"has repeated crops: {list(loss.crops_for_assign)}")
    for c in loss.crops_for_assign:
        if not 0 <= c < n_global:
            fail("loss.crops_for_assign", f"crop {c} is out of range: codes come from the global crops "
                 f"0..{n_global - 1} (nmb_crops[0] = {n_global})")

    # optim
    positive("optim", "base_lr", "momentum", allow_zero=True)
    positive("optim", "final_lr", "start_warmup", "weight_decay", "larc_trust_coefficient",
             "warmup_epochs", "freeze_prototypes_niters", allow_zero=True)
    if optim.final_lr > optim.base_lr:
        fail("optim.final_lr", f"= {optim.final_lr} is larger than optim.base_lr = {optim.base_lr}")
    if optim.momentum >= 1:
        fail("optim.momentum", f"must be < 1, got {optim.momentum}")

    # train
    positive("train", "epochs", "batch_size_per_worker", "num_workers", "checkpoint_every_epochs",
             "keep_checkpoints", "log_every_steps", "max_nonfinite_steps")
    positive("train", "max_failures", "collapse_window_epochs", allow_zero=True)
    if train.precision not in PRECISIONS:
        fail("train.precision", f"must be one of {', '.join(PRECISIONS)}, got {train.precision!r}")
    if not train.compile_backend:
        fail("train.compile_backend", "must name a torch.compile backend (e.g. inductor)")
    if config.eval.precision not in PRECISIONS:
        fail("eval.precision", f"must be one of {', '.join(PRECISIONS)}, got {config.eval.precision!r}")
    if config.data.bad_shard_action not in BAD_SHARD_ACTIONS:
        fail("data.bad_shard_action", f"must be one of {', '.join(BAD_SHARD_ACTIONS)}, "
             f"got {config.data.bad_shard_action!r}")
    if config.ray.placement_strategy not in PLACEMENT_STRATEGIES:
        fail("ray.placement_strategy", f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
             f"got {config.ray.placement_strategy!r}")
    if train.collapse_action not in COLLAPSE_ACTIONS:
        fail("train.collapse_action", f"must be one of {', '.join(COLLAPSE_ACTIONS)}, "
             f"got {train.collapse_action!r}")
    if train.init_from != train.init_from.strip():
        fail("train.init_from", f"has leading or trailing spaces: {train.init_from!r}")
    if optim.warmup_epochs > train.epochs:
        fail("optim.warmup_epochs", f"= {optim.warmup_epochs} is longer than train.epochs = {train.epochs}")

    # queue
    positive("queue", "queue_length", "epoch_queue_starts", "local_queue_length", allow_zero=True)
    global_batch = train.batch_size_per_worker * train.num_workers
    if 0 < queue.queue_length < global_batch:
        fail("queue.queue_length", f"= {queue.queue_length} is shorter than the global batch "
             f"(train.batch_size_per_worker x train.num_workers = {global_batch}); use 0 for no queue")
    local_rows = global_batch * (model.feat_dim // model.nmb_groups_heads)
    if 0 < queue.local_queue_length < local_rows:
        fail("queue.local_queue_length", f"= {queue.local_queue_length} is shorter than the local rows "
             f"of one global step (global batch x S = {local_rows}); use 0 for no local queue")

    # data / eval / ray / tracking
    if not config.data.shards:
        fail("data.shards", "must name the shard location")
    positive("data", "max_images", "read_parallelism", "prefetch_batches", allow_zero=True)
    positive("data", "crop_cpus")
    ev = config.eval
    if ev.dataset not in EVAL_DATASETS:
        fail("eval.dataset", f"must be one of {', '.join(EVAL_DATASETS)}, got {ev.dataset!r}")
    positive("eval", "epochs", "batch_size", "lr", "image_size", "resize_size", "num_workers")
    positive("eval", "weight_decay", "grad_clip", "momentum", allow_zero=True)
    if ev.resize_size < ev.image_size:
        fail("eval.resize_size", f"= {ev.resize_size} is smaller than eval.image_size = {ev.image_size}")
    positive("eval", "online_every_epochs", "online_bank_images", "online_query_images", "online_cache_mb",
             allow_zero=True)
    positive("eval", "online_knn_k", "online_knn_temperature")
    positive("train", "collapse_min_map_gain", allow_zero=True)
    positive("ray", "num_cpus_per_worker")
    if not config.tracking.experiment:
        fail("tracking.experiment", "must not be empty")


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline ([224, 96])."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML (every key, defaults included); load_config reads it back."""
    return yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
