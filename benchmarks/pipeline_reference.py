"""Reference multi-crop pipeline, written the way SwAV-style published training code does it.

This is the baseline that gaelle-ray's pipeline (``gaelle_ray.data.crops`` on the CPU plus
the batched ``gaelle_ray.data.colour`` on the device) is benchmarked against. It follows
method.md section 1 literally, one image and one crop at a time, on PIL images (the colour
settings written out as published, on purpose: a baseline independent of our code):

    per image: decode with PIL, convert to RGB
    per crop:  RandomResizedCrop(size, scale) -> RandomHorizontalFlip()
               -> RandomApply([ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8) -> RandomGrayscale(0.2)
               -> Gaussian blur (PIL, radius uniform in [0.1, 2.0]) with p=0.5
               -> ToTensor() -> Normalize(mean, std)

``reference_dataset(jpegs, aug)[i]`` returns the list of ``aug.num_crops`` float tensors
(3, S, S) of image i, global crops first. With a ``torch.utils.data.DataLoader`` and the
default collate, a batch is a list of (B, 3, S, S) tensors, one per crop, as in SwAV.
Randomness comes from ``random`` and torch's global RNG, as in the published code.
"""

from __future__ import annotations

import io
import random
from typing import Sequence

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from gaelle_ray.config import MEAN, STD, AugmentationConfig

__all__ = ["PILRandomGaussianBlur", "ReferenceMultiCropDataset", "colour_distortion",
           "crop_transform", "reference_dataset"]


class PILRandomGaussianBlur:
    """With probability ``p``, blur a PIL image with ``ImageFilter.GaussianBlur(radius)``,
    radius uniform in [radius_min, radius_max] (PIL's radius is the Gaussian's sigma)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        radius = random.uniform(self.radius_min, self.radius_max)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def colour_distortion(strength: float = 1.0) -> T.Compose:
    """Colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, then grayscale with p=0.2."""
    jitter = T.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    return T.Compose([T.RandomApply([jitter], p=0.8), T.RandomGrayscale(p=0.2)])


def crop_transform(size: int, scale: tuple[float, float],
                   ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> T.Compose:
    """The full per-crop transform: PIL image -> normalised float tensor (3, size, size)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, ratio=ratio),
        T.RandomHorizontalFlip(p=0.5),
        colour_distortion(1.0),
        PILRandomGaussianBlur(p=0.5, radius_min=0.1, radius_max=2.0),
        T.ToTensor(),
        T.Normalize(mean=MEAN, std=STD),
    ])


class ReferenceMultiCropDataset(torch.utils.data.Dataset):
    """A dataset over in-memory JPEG bytes that returns every crop of an image.

    ``jpegs``: sequence of encoded images; ``aug``: the crop geometry (sizes, counts, scales,
    ratio). Item i: list of ``aug.num_crops`` tensors, each (3, S_r, S_r) float32, global
    crops first.
    """

    def __init__(self, jpegs: Sequence[bytes], aug: AugmentationConfig) -> None:
        self.jpegs = jpegs
        self.aug = aug
        self.transforms = [crop_transform(size, scale, tuple(aug.ratio))
                           for size, scale in zip(aug.crop_sizes(), aug.crop_scales())]

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        with Image.open(io.BytesIO(self.jpegs[index])) as img:
            image = img.convert("RGB")
        return [transform(image) for transform in self.transforms]


def reference_dataset(jpegs: Sequence[bytes],
                      aug: AugmentationConfig | None = None) -> ReferenceMultiCropDataset:
    """The reference pipeline over ``jpegs`` (method.md section 1 crops when aug is None)."""
    return ReferenceMultiCropDataset(jpegs, AugmentationConfig() if aug is None else aug)
