from .unet_edm import (
    ADM_IMAGENET64,
    DDPMPP_CIFAR10,
    NCSNPP_CIFAR10,
    DhariwalUNet2DModel,
    EDMUNet2DOutput,
    SongUNet2DModel,
)
from .unet_edm2 import EDM2_PRESETS, EDM2UNet2DModel, EDM2UNet2DOutput
from .unet_scm import PRESETS, SCMUNet2DModel, SCMUNet2DOutput


__all__ = [
    "SCMUNet2DModel",
    "SCMUNet2DOutput",
    "PRESETS",
    "EDM2UNet2DModel",
    "EDM2UNet2DOutput",
    "EDM2_PRESETS",
    "SongUNet2DModel",
    "DhariwalUNet2DModel",
    "EDMUNet2DOutput",
    "DDPMPP_CIFAR10",
    "NCSNPP_CIFAR10",
    "ADM_IMAGENET64",
]
