"""The online evaluation: the vectorised k-NN against its plain loop in the reference
oracle, the probe on toy shards (one process, and sharded over two gloo workers), and the
collapse watch that reads it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gaelle_ray.eval.online import OnlineProbe, OnlineSettings, knn_multilabel
from gaelle_ray.reference import naive_knn_multilabel
from gaelle_ray.train.collapse import online_collapse_check

from .conftest import random_backbone, small_config


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (5, 0.07), (50, 0.5)])
def test_knn_equals_the_plain_loop(k, temperature):
    g = torch.Generator().manual_seed(k)
    bank = torch.randn(40, 8, generator=g)
    labels = (torch.rand(40, 6, generator=g) < 0.3).to(torch.uint8)
    queries = torch.randn(13, 8, generator=g)
    got = knn_multilabel(bank, labels, queries, k, temperature, chunk=5)  # several chunks
    want = naive_knn_multilabel(bank, labels, queries, k, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_knn_ignores_ignore_labels_and_uses_the_nearest():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    labels = torch.tensor([[1, 0], [0, 1], [255, 1]], dtype=torch.uint8)  # 255 = ignore: not a vote
    scores = knn_multilabel(bank, labels, torch.tensor([[1.0, 0.05]]), k=2, temperature=0.1)
    assert scores.shape == (1, 2)
    # neighbours: rows 0 and 2; class 0 gets row 0's vote only, class 1 row 2's only
    w0, w2 = np.exp(float(torch.nn.functional.cosine_similarity(torch.tensor([1.0, 0.05]), bank[0], 0)) / 0.1), \
        np.exp(float(torch.nn.functional.cosine_similarity(torch.tensor([1.0, 0.05]), bank[2], 0)) / 0.1)
    assert float(scores[0, 0]) == pytest.approx(w0 / (w0 + w2), rel=1e-5)
    assert float(scores[0, 1]) == pytest.approx(w2 / (w0 + w2), rel=1e-5)


def _settings(shards, **kw):
    config = small_config(shards, **{"online_every_epochs": 1, "online_bank_images": 24, "online_knn_k": 5, **kw})
    return OnlineSettings.from_config(config)


def test_settings_follow_the_config(toy_shards):
    s = _settings(toy_shards)
    assert (s.bank_split, s.query_split, s.bank_images, s.query_images) == ("train", "val", 24, 0)
    assert s.due(0, 5) and s.due(4, 5)
    assert not _settings(toy_shards, online_every_epochs=2).due(0, 5)
    assert OnlineSettings.from_config(small_config(toy_shards)) is None  # off by default


def test_probe_scores_a_backbone_in_one_process(toy_shards):
    probe = OnlineProbe(_settings(toy_shards, online_linear=True))
    assert probe.sizes == (24, 16)
    backbone = random_backbone(0)
    backbone.train()
    result = probe.evaluate(backbone, torch.device("cpu"))
    assert backbone.training  # mode restored
    assert 0.0 < result["online_map"] <= 1.0 and 0.0 < result["online_linear_map"] <= 1.0
    again = probe.evaluate(backbone, torch.device("cpu"))  # decoded images reused: same numbers
    assert again == result


def _worker(rank, port, shards, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    probe = OnlineProbe(_settings(shards), rank, 2)
    result = probe.evaluate(random_backbone(0), torch.device("cpu"), dist.group.WORLD)
    torch.save({"result": result, "rows": [len(m) for m in probe.mine]}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_workers_score_what_one_scores(toy_shards, tmp_path, free_port):
    mp.start_processes(_worker, args=(free_port(), toy_shards, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["rows"] == [12, 8] and r1["rows"] == [12, 8]  # each worker extracts its half
    one = OnlineProbe(_settings(toy_shards)).evaluate(random_backbone(0), torch.device("cpu"))
    assert r0["result"] == r1["result"]  # every worker gets rank 0's numbers
    assert r0["result"]["online_map"] == pytest.approx(one["online_map"], abs=1e-6)


def test_online_collapse_watch():
    config = small_config("x", online_every_epochs=1).replace({"train.collapse_window_epochs": 3,
                                                               "train.collapse_min_map_gain": 0.01})
    flat = [{"epoch": e, "online_map": 0.300 + 0.001 * e, "online_map_epoch": e} for e in range(4)]
    assert online_collapse_check(flat[:2], 0.3, 1, config) is None  # the window has not passed
    message = online_collapse_check(flat[:3], 0.3, 2, config)
    assert message and "stayed at its random-init baseline 30.0 for 3 epochs" in message
    learning = flat[:2] + [{"epoch": 2, "online_map": 0.33, "online_map_epoch": 2}]
    assert online_collapse_check(learning, 0.3, 2, config) is None
    assert online_collapse_check(flat[:3], None, 2, config) is None  # no baseline: no verdict
    sparse = [{"epoch": e, "online_map": 0.29, "online_map_epoch": e} for e in (2,)]  # one point in the window
    assert online_collapse_check(sparse, 0.3, 2, config) is None


def test_evaluation_leaves_the_random_streams_as_they_were(toy_shards):
    probe = OnlineProbe(_settings(toy_shards, online_linear=True))  # the linear probe draws numbers too
    backbone = random_backbone(1).train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe.evaluate(backbone, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
