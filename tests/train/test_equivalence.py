"""One step with 2 gloo workers x B images gives the loss and gradients of 1 worker x 2B:
synchronised BatchNorm (our GroupBatchNorm, since torch's SyncBatchNorm refuses CPU
tensors), per-position statistics with one collective, and distributed Sinkhorn.

The network runs in float64 here: in float32 the gradients of the first layers, through a
dozen BatchNorms, differ by ~0.3% between any two summation orders (measured: 2.6e-3
relative for conv1 vs 6e-6 for layer4), which would hide a real mismatch. In float64 the
only float32 left is Sinkhorn (method.md), and both sides agree to ~1e-7."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gaelle_ray.losses.gaelle import LossSettings, gaelle_losses
from gaelle_ray.model.gaelle import GaelleModel
from gaelle_ray.model.norm import convert_group_batchnorm

B, VG, VL, D, H = 3, 2, 4, 16, 4
S = D // H


def _setup(group=None):
    torch.manual_seed(0)
    model = GaelleModel("resnet18", hidden_mlp=32, feat_dim=D, nmb_prototypes=10, nmb_local_prototypes=8,
                        nmb_groups_heads=H, l2g_detach=False, position_group=group).train().double()
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(VG * 2 * B, 3, 64, 64, generator=g, dtype=torch.float64),
             torch.randn(VL * 2 * B, 3, 32, 32, generator=g, dtype=torch.float64)]
    return model, crops, torch.stack([torch.randperm(S, generator=g) for _ in range(VG)])  # one per local pair


def _my_rows(crops, rank):
    """Worker `rank` gets images [rank*B, (rank+1)*B) of every crop, crop-major."""
    out = []
    for c in crops:
        v = c.shape[0] // (2 * B)
        out.append(c.reshape(v, 2 * B, *c.shape[1:])[:, rank * B:(rank + 1) * B].reshape(v * B, *c.shape[1:]))
    return out


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    group = dist.group.WORLD
    model, crops, perm = _setup(group)
    model = convert_group_batchnorm(model, group)
    ddp = DDP(model, broadcast_buffers=False)
    settings = LossSettings(batch_size=B, n_crops=VG + VL, n_global=VG, n_slots=S)
    terms = gaelle_losses(ddp(_my_rows(crops, rank)), settings, slot_perms=perm, group=group)
    terms.total.backward()
    torch.save({"loss": terms.total.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
                "buffers": dict(model.named_buffers())}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_workers_equal_one_worker_with_the_global_batch(tmp_path, free_port):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    model, crops, perm = _setup()
    settings = LossSettings(batch_size=2 * B, n_crops=VG + VL, n_global=VG, n_slots=S)
    terms = gaelle_losses(model(crops), settings, slot_perms=perm)
    terms.total.backward()

    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, terms.total.detach(), rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        # DDP averages gradients: every worker holds the gradient of the mean loss
        for r in (r0, r1):
            diff = (r["grads"][name] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
            assert diff < 1e-5 or (r["grads"][name] - p.grad).abs().max() < 1e-9, (name, float(diff))
    for name, buf in model.named_buffers():
        torch.testing.assert_close(r0["buffers"][name].to(buf.dtype), buf, rtol=1e-6, atol=1e-8, msg=name)
