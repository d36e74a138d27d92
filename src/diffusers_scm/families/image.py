"""The text-to-image families of the first release: SD3/SD3.5, Flux.1, Sana, PixArt-Sigma/Alpha, SD 1.5, SDXL
(their prompt encodings are in `diffusers_scm.conditioning`)."""

from ..conditioning import (
    FluxPromptEncoding,
    MaskedT5PromptEncoding,
    SanaPromptEncoding,
    SD3PromptEncoding,
    SDPromptEncoding,
    SDXLPromptEncoding,
)
from . import Family, register_family


CLIP_T5 = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
register_family(
    Family("StableDiffusion3Pipeline", SD3PromptEncoding, text_components=(*CLIP_T5, "text_encoder_3", "tokenizer_3"))
)
register_family(Family("FluxPipeline", FluxPromptEncoding, text_components=CLIP_T5))
register_family(Family("SanaPipeline", SanaPromptEncoding, own_sampler=None))
register_family(Family("PixArtSigmaPipeline", MaskedT5PromptEncoding, own_sampler=None))
register_family(Family("PixArtAlphaPipeline", MaskedT5PromptEncoding, own_sampler=None))
register_family(Family("StableDiffusionPipeline", SDPromptEncoding, network="unet", own_sampler=None))
register_family(
    Family("StableDiffusionXLPipeline", SDXLPromptEncoding, network="unet", own_sampler=None, text_components=CLIP_T5)
)
