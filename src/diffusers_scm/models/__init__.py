from .unet_scm import PRESETS, SCMUNet2DModel, SCMUNet2DOutput


__all__ = ["SCMUNet2DModel", "SCMUNet2DOutput", "PRESETS"]
