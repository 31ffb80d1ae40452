"""eval.precision: the evaluation forwards autocast as training does, on a CPU too."""

import math

import torch

from gaelle_ray.eval.features import EvalTransform, ShardImages, extract_features, feature_cache_key
from gaelle_ray.eval.probe import ProbeSettings
from gaelle_ray.eval.semisup import SemisupSettings, label_subset, semisup_finetune


def test_features_in_bf16_are_close_to_fp32_and_cached_apart(toy_shards, make_backbone, tmp_path):
    backbone = make_backbone()
    test = ShardImages(toy_shards, "val", EvalTransform(False, 40, 48))
    seen = []
    hook = backbone.layer4.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    f32, _, _ = extract_features(backbone, test, 8, cache_dir=tmp_path)
    bf16, _, _ = extract_features(backbone, test, 8, cache_dir=tmp_path, precision="bf16")
    hook.remove()
    assert torch.float32 in seen and torch.bfloat16 in seen  # the second pass ran in bfloat16
    assert bf16.dtype == torch.float32  # features are float32 either way
    assert not torch.equal(f32, bf16)  # not a cache hit of the fp32 features
    rel = float((bf16 - f32).norm() / f32.norm())
    assert rel < 2e-2, rel
    assert feature_cache_key(backbone, test) != feature_cache_key(backbone, test, "bf16")
    assert len(list(tmp_path.glob("features-val-*.pt"))) == 2


def test_probe_settings_take_eval_precision(make_config):
    assert ProbeSettings.from_config(make_config("x")).precision == "fp32"
    assert ProbeSettings.from_config(make_config("x", precision="bf16")).precision == "bf16"


def test_semisup_fp16_runs_with_a_grad_scaler(toy_shards, make_backbone, monkeypatch):
    scalers = []
    real = torch.amp.GradScaler.step

    def spy(self, optimizer, *args, **kwargs):
        scalers.append(self)
        return real(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", spy)
    backbone = make_backbone()
    full = ShardImages(toy_shards, "train", EvalTransform(True, 40, 48))
    train = full.select(label_subset(full.image_ids, 25, seed=0))
    test = ShardImages(toy_shards, "val", EvalTransform(False, 40, 48))
    settings = SemisupSettings(percent=25, epochs=1, batch_size=4, milestones=(1,), image_size=40, resize_size=48,
                               precision="fp16")
    result = semisup_finetune(backbone, train, test, settings)
    assert math.isfinite(result.map_final)
    assert scalers and all(s.is_enabled() for s in scalers)
    assert len(scalers) == 2  # one scaled step per batch of 4 among the 8 labelled images
