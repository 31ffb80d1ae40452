"""The GAELLE network: torchvision ResNet backbone, heads, semantic attention, prototypes."""

from gaelle_ray.model.gaelle import GaelleModel, GaelleOutput, build_model

__all__ = ["GaelleModel", "GaelleOutput", "build_model"]
