"""ResNet backbones from torchvision, without the classifier.

The backbone keeps torchvision's module names (conv1, bn1, layer1..layer4), so its state
dict is a torchvision state dict less `fc.*`; `export_torchvision_state` adds a zero `fc`
back so that `torchvision.models.<arch>()` loads it strictly.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

_CONSTRUCTORS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
    "wide_resnet50_2": torchvision.models.wide_resnet50_2,
}


def build_backbone(arch: str) -> nn.Module:
    """A randomly initialised torchvision ResNet with `fc` replaced by Identity.

    The returned module has an attribute `num_features` (512 for resnet18/34, 2048 otherwise).
    """
    if arch not in _CONSTRUCTORS:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of {', '.join(_CONSTRUCTORS)}")
    net = _CONSTRUCTORS[arch](weights=None)
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    return net


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last feature map of a torchvision ResNet.

    x: (N, 3, H, W) -> (N, C, h, w) with h = ceil(H / 32).
    """
    x = backbone.conv1(x)
    x = backbone.bn1(x)
    x = backbone.relu(x)
    x = backbone.maxpool(x)
    x = backbone.layer1(x)
    x = backbone.layer2(x)
    x = backbone.layer3(x)
    return backbone.layer4(x)


def export_torchvision_state(backbone: nn.Module, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """The backbone as a plain torchvision ResNet state dict (tensors on CPU).

    torchvision's constructors always build `fc`; it is exported as zeros of shape
    (num_classes, C) and (num_classes,), to be replaced by whatever head the user trains.
    """
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    width = backbone.num_features
    state["fc.weight"] = torch.zeros(num_classes, width)
    state["fc.bias"] = torch.zeros(num_classes)
    return state
