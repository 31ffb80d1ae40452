"""The GAELLE network of method.md section 2.

Notation: B images per worker, Vg global crops (the first resolution), V crops in all,
C backbone channels (2048 for ResNet-50), d embedding size, K / K_l prototypes,
H head groups, S = d / H local slots, P = h*w positions of the last feature map.

Parameter names follow the released script (section 9) with the backbone under
`backbone.`: `projection_head.{0,1,3}`, `local_projection_head.{0,1,3}`,
`prototypes`, `local_prototypes`, `l2g_prototypes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gaelle_ray.model.backbone import build_backbone, feature_map
from gaelle_ray.model.norm import batch_norm_positions


class ProjectionHead(nn.Sequential):
    """Linear(C, hidden) - BatchNorm1d - ReLU - Linear(hidden, d), indices 0, 1, 2, 3."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))

    def forward_positions(self, x: torch.Tensor, group=None) -> torch.Tensor:
        """The head applied to every position separately, as the released script's loop does.

        x: (N, P, C) -> (N, P, d); BatchNorm statistics per position (see model/norm.py),
        shared across the workers of `group` when given.
        """
        hidden = self[0](x)  # (N, P, hidden)
        hidden = batch_norm_positions(hidden, self[1], group)  # (N, P, hidden)
        return self[3](F.relu(hidden))  # (N, P, d)


def semantic_attention(fmap: torch.Tensor, head: ProjectionHead, n_groups: int,
                       temperature: float = 1.0, group=None) -> torch.Tensor:
    """Local descriptors pooled by semantic attention.

    fmap: (N, C, h, w) last feature map of N global-crop images.
    Returns (N * S, C) local descriptors, image-major (row = n * S + j), S = d / H.

    A = head(fmap[:, :, p]) for every position p -> (N, P, d); L2-normalised over d,
    divided by `temperature`, softmax over P. Map m = k * S + j belongs to group k; group
    k's C/H channels are pooled with each of its S maps and the groups are concatenated
    along the channels.
    """
    n, c, h, w = fmap.shape
    if c % n_groups:
        raise ValueError(f"semantic_attention: {c} channels are not divisible by {n_groups} head groups")
    feats = fmap.flatten(2)  # (N, C, P)
    scores = head.forward_positions(feats.transpose(1, 2), group)  # (N, P, d)
    d = scores.shape[-1]
    if d % n_groups:
        raise ValueError(f"semantic_attention: d = {d} is not divisible by {n_groups} head groups")
    s = d // n_groups
    attn = F.normalize(scores, dim=-1) / temperature  # (N, P, d)
    attn = attn.softmax(dim=1)  # (N, P, d) softmax over positions
    attn = attn.reshape(n, h * w, n_groups, s)  # (N, P, H, S)
    grouped = feats.reshape(n, n_groups, c // n_groups, h * w)  # (N, H, C/H, P)
    pooled = torch.einsum("nhcp,nphs->nhcs", grouped.to(attn.dtype), attn)  # (N, H, C/H, S)
    pooled = pooled.reshape(n, c, s)  # (N, C, S) groups concatenated along channels
    return pooled.transpose(1, 2).reshape(n * s, c)  # (N*S, C) row = n*S + j


def check_crop_layout(crops) -> None:
    """Refuse anything but GaelleModel.forward's layout: a list with one 4-d tensor
    (n_r*B, 3, S_r, S_r) per resolution, no two neighbours of the same size.

    The released script's forward takes one (B, 3, S, S) tensor per crop (a list of 8: two
    224 px, six 96 px) and groups equal sizes itself. Given to this forward, that list would
    run the attention on the first crop alone and fail much later in a loss. Two neighbouring
    tensors of the same size can only be that layout: ours has the crops of one size in one
    tensor (config.py refuses a size_crops list with two equal neighbours).
    """
    expected = ("one tensor per resolution, the crops of that resolution concatenated crop-major "
                "(row = v*B + b), global crops first, e.g. [(2*B, 3, 224, 224), (6*B, 3, 96, 96)]")
    if not isinstance(crops, (list, tuple)) or not crops:
        raise ValueError(f"GaelleModel.forward needs a non-empty list of crop batches: {expected}")
    for i, batch in enumerate(crops):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] != 3:
            what = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"GaelleModel.forward: crops[{i}] is {what}, expected (n_r*B, 3, S, S); "
                             f"the input is {expected}")
    for i in range(1, len(crops)):
        if crops[i].shape[-2:] == crops[i - 1].shape[-2:]:
            size = "x".join(str(int(n)) for n in crops[i].shape[-2:])
            raise ValueError(
                f"GaelleModel.forward got {len(crops)} tensors and crops[{i - 1}] and crops[{i}] are both {size} px: "
                "that is the released script's per-crop layout (one (B, 3, S, S) tensor per crop); this model "
                f"expects {expected}: concatenate the crops of each size, e.g. "
                "[torch.cat(crops[:2]), torch.cat(crops[2:])] for 2 global + 6 local crops")


@dataclass
class GaelleOutput:
    """What one forward pass gives the losses (rows crop-major: row = v * B + b).

    embeddings: (V*B, d) normalised global embeddings e.
    scores: (V*B, K) global prototype scores s = e C^T.
    local_embeddings: (Vg*B*S, d) normalised local embeddings l (row = (v*B + b)*S + j).
    local_scores: (Vg*B*S, K_l) r = l Cl^T.
    l2g_scores: (Vg*B, K) t = normalize(mean_j l) E^T.
    A branch the model does not compute (`GaelleModel.branches`) is None: local_embeddings
    without the attention, local_scores without the local loss, l2g_scores without the
    local-to-global loss.
    """

    embeddings: torch.Tensor
    scores: torch.Tensor
    local_embeddings: torch.Tensor | None
    local_scores: torch.Tensor | None
    l2g_scores: torch.Tensor | None


class GaelleModel(nn.Module):
    """Backbone + global head + semantic attention + local head + three prototype layers."""

    def __init__(self, arch: str = "resnet50", hidden_mlp: int = 2048, feat_dim: int = 128,
                 nmb_prototypes: int = 3000, nmb_local_prototypes: int = 3000,
                 nmb_groups_heads: int = 4, attention_temperature: float = 1.0,
                 l2g_detach: bool = True, position_group=None, local_loss: bool = True, l2g_loss: bool = True):
        """position_group: the process group whose workers share the per-position BatchNorm
        statistics of the attention head (None: this process alone).
        local_loss / l2g_loss: whether those losses are trained (a weight of 0 turns them
        off): the forward computes only the branches they need, and the parameters of an
        unused branch stay in the state dict but are frozen (requires_grad False, so DDP
        and the optimiser leave them alone). Both off = SwAV: no attention at all."""
        super().__init__()
        if feat_dim % nmb_groups_heads:
            raise ValueError(f"feat_dim d = {feat_dim} is not divisible by nmb_groups_heads H = {nmb_groups_heads}")
        self.backbone = build_backbone(arch)
        width = self.backbone.num_features
        if width % nmb_groups_heads:
            raise ValueError(f"{arch} has {width} channels, not divisible by nmb_groups_heads H = {nmb_groups_heads}")
        self.projection_head = ProjectionHead(width, hidden_mlp, feat_dim)
        self.local_projection_head = ProjectionHead(width, hidden_mlp, feat_dim)
        self.prototypes = nn.Linear(feat_dim, nmb_prototypes, bias=False)
        self.local_prototypes = nn.Linear(feat_dim, nmb_local_prototypes, bias=False)
        self.l2g_prototypes = nn.Linear(feat_dim, nmb_prototypes, bias=False)
        self.arch = arch
        self.feat_dim = feat_dim
        self.n_groups = nmb_groups_heads
        self.n_slots = feat_dim // nmb_groups_heads
        self.attention_temperature = attention_temperature
        self.l2g_detach = l2g_detach
        self.position_group = position_group
        self.branches = {"local": bool(local_loss), "l2g": bool(l2g_loss)}
        # without the local loss, a detached l2g loss sends no gradient into the local branch
        self.local_branch_trains = bool(local_loss) or not l2g_detach
        unused = []
        if not local_loss:
            unused.append(self.local_prototypes)
        if not l2g_loss:
            unused.append(self.l2g_prototypes)
        if not self.local_branch_trains:
            unused.append(self.local_projection_head)
        for module in unused:
            module.requires_grad_(False)

    @property
    def attention_on(self) -> bool:
        """Whether the forward runs the semantic attention (some loss uses local embeddings)."""
        return self.branches["local"] or self.branches["l2g"]

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward(self, crops: Sequence[torch.Tensor]) -> GaelleOutput:
        """crops: one tensor per resolution, (n_r*B, 3, S_r, S_r), crop-major (row = v*B + b).

        The first resolution holds the global crops. One backbone call per resolution.
        The released script's layout (one tensor per crop, section 9) is refused: see
        `check_crop_layout`.
        """
        check_crop_layout(crops)
        fmap = feature_map(self.backbone, crops[0])  # (Vg*B, C, h, w)
        pooled = [fmap.mean(dim=(2, 3))]  # (Vg*B, C)
        for batch in crops[1:]:
            pooled.append(feature_map(self.backbone, batch).mean(dim=(2, 3)))  # (n_r*B, C)
        z = torch.cat(pooled)  # (V*B, C)

        e = F.normalize(self.projection_head(z), dim=1)  # (V*B, d)
        scores = self.prototypes(e)  # (V*B, K)

        if not self.attention_on:
            return GaelleOutput(e, scores, None, None, None)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.local_branch_trains):
            local = semantic_attention(fmap, self.projection_head, self.n_groups,
                                       self.attention_temperature, self.position_group)  # (Vg*B*S, C)
            l = F.normalize(self.local_projection_head(local), dim=1)  # (Vg*B*S, d)
        local_scores = self.local_prototypes(l) if self.branches["local"] else None  # (Vg*B*S, K_l)

        l2g_scores = None
        if self.branches["l2g"]:
            slots = (l.detach() if self.l2g_detach else l).reshape(-1, self.n_slots, self.feat_dim)  # (Vg*B, S, d)
            mean_local = F.normalize(slots.mean(dim=1), dim=1)  # (Vg*B, d)
            l2g_scores = self.l2g_prototypes(mean_local)  # (Vg*B, K)
        return GaelleOutput(e, scores, l, local_scores, l2g_scores)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise the rows of all three prototype matrices (before every step)."""
        for layer in (self.prototypes, self.local_prototypes, self.l2g_prototypes):
            layer.weight.copy_(F.normalize(layer.weight, dim=1))


def build_model(config, position_group=None) -> GaelleModel:
    """GaelleModel from a validated `gaelle_ray.config.Config`; position_group: the process
    group of the training workers (None: one worker). A loss with weight 0 turns its branch off."""
    m, loss = config.model, config.loss
    return GaelleModel(arch=m.arch, hidden_mlp=m.hidden_mlp, feat_dim=m.feat_dim,
                       nmb_prototypes=m.nmb_prototypes, nmb_local_prototypes=m.nmb_local_prototypes,
                       nmb_groups_heads=m.nmb_groups_heads, attention_temperature=m.attention_temperature,
                       l2g_detach=loss.l2g_detach, position_group=position_group,
                       local_loss=loss.weight_local != 0, l2g_loss=loss.weight_l2g != 0)
