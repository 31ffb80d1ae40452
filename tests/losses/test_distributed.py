"""Two gloo processes equal one process on the concatenated batch: Sinkhorn codes and the
per-position BatchNorm of the semantic attention (with one collective, not one per position)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gaelle_ray.losses.sinkhorn import sinkhorn
from gaelle_ray.model.gaelle import ProjectionHead, semantic_attention


def _inputs():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(2, 2 * 24, 12, generator=g), dim=-1)  # (A, 2N, K)
    torch.manual_seed(0)
    head = ProjectionHead(32, 40, 16)
    fmap = torch.randn(2 * 4, 32, 3, 3, generator=g).relu()  # (2N, C, h, w)
    return scores, head, fmap


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    scores, head, fmap = _inputs()
    mine = scores[:, rank * 24:(rank + 1) * 24]
    codes = sinkhorn(mine, 0.05, 3, group=dist.group.WORLD)

    calls = []
    original = dist.all_gather

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    dist.all_gather = counting  # the statistics' only collective in the forward pass
    head.train()
    x = fmap[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    local = semantic_attention(x, head, 4, group=dist.group.WORLD)
    forward_calls = len(calls)
    local.square().sum().backward()
    torch.save({"codes": codes, "local": local.detach(), "grad": x.grad, "calls": forward_calls,
                "running_mean": head[1].running_mean, "running_var": head[1].running_var,
                "w_grad": head[0].weight.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path, free_port):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    scores, head, fmap = _inputs()

    single = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(torch.cat([r0["codes"], r1["codes"]], dim=1), single, rtol=1e-5, atol=1e-7)

    head.train()
    x = fmap.clone().requires_grad_(True)
    local = semantic_attention(x, head, 4)
    local.square().sum().backward()
    torch.testing.assert_close(torch.cat([r0["local"], r1["local"]]), local.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0["grad"], r1["grad"]]), x.grad, rtol=1e-3, atol=1e-5)
    # DDP sums then averages worker gradients; the sum over workers is the 1-process gradient
    torch.testing.assert_close(r0["w_grad"] + r1["w_grad"], head[0].weight.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(r0["running_mean"], head[1].running_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r0["running_var"], head[1].running_var, rtol=1e-4, atol=1e-6)
    assert r0["calls"] == 1  # one collective for all 9 positions
