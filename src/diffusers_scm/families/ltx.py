"""LTX-Video: `LTXPipeline` (text-to-video), `LTXVideoTransformer3DModel`, a T5 text encoder and
`AutoencoderKLLTXVideo` (SPEC.md section 8).

Latents: x0 = (z - latents_mean) * scaling_factor / latents_std per channel, 5-D (B, 128, F', H/32, W/32) with
F' = (F - 1) / 8 + 1 for the released VAE (`LTXLatentCodec`, as `LTXPipeline._normalize_latents` /
`_denormalize_latents`; the statistics are buffers of the VAE, not entries of its config). Decoding passes the VAE's
decode timestep where it has `timestep_conditioning` (LTX 0.9.1 and later), at the pipeline's default
`decode_timestep=0.0` and `decode_noise_scale=None` (no noise added).

Network call: the pipeline packs the 5-D latent into tokens of patch_size_t x patch_size x patch_size latents
(`LTXPipeline._pack_latents`) and passes `timestep = 1000 s` (flow matching, its scheduler's shifted times), the T5
states with their padding mask (`encoder_attention_mask`), the latent grid (`num_frames`, `height`, `width`, in
patches) and `rope_interpolation_scale = (temporal_ratio / frame_rate, spatial_ratio, spatial_ratio)` (the VAE's
compression ratios, `frame_rate=25` by default). `LTXAdapter` packs and unpacks; the prompt encoding puts the
interpolation scale into the conditioning (`rope_interpolation_scale`, one row (3,) per sample), as it is a property
of the pipeline's VAE that the network alone does not know. Classifier-free guidance against the negative prompt (the
empty one by default), F_u + w (F_c - F_u) (`guidance_rescale=0`, the pipeline's default).

Sampling a student in LTXPipeline: its `__call__` takes no `sigmas=` (it sets its own grid, linspace(1, 1/n, n)
shifted by the sequence length, through `scheduler.set_timesteps(sigmas=..., mu=...)`), so `own_sampler` is
"scheduler": the student folder carries `TrigFlowFamilyScheduler`, which takes that default grid as n steps at the
student's own times, and `LTXPipeline.from_pretrained(student)(prompt, num_inference_steps=1, guidance_scale=1.0)`
gives SCMPipeline's one-step samples from the same (packed) noise. With two steps the samples differ by the
re-noising draw alone: LTXPipeline's scheduler draws it in the packed token layout (B, F h w, C), SCMPipeline in
(B, C, F, h, w).
"""

import torch

from ..adapters import NetworkAdapter, register_adapter
from ..conditioning import MaskedPromptEncoding, VideoLatentCodec
from . import Family, register_family


__all__ = ["LTXPromptEncoding", "LTXLatentCodec", "LTXAdapter", "DEFAULT_FRAME_RATE", "pack_video", "unpack_video"]

DEFAULT_FRAME_RATE = 25  # LTXPipeline.__call__'s `frame_rate`


def pack_video(latents: torch.Tensor, patch_size: int = 1, patch_size_t: int = 1) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F/pt * H/p * W/p, C * pt * p * p): `LTXPipeline._pack_latents`."""
    if latents.ndim != 5:
        raise ValueError(
            f"LTX networks take the unpacked 5-D latent (B, C, F, H, W) here, got a tensor of shape "
            f"{tuple(latents.shape)}: unpack a token sequence first with `diffusers_scm.families.ltx.unpack_video`."
        )
    b, _, f, h, w = latents.shape
    if f % patch_size_t or h % patch_size or w % patch_size:
        raise ValueError(
            f"The latent grid {f}x{h}x{w} (frames x height x width) is not a multiple of the network's patch "
            f"({patch_size_t}x{patch_size}x{patch_size}): choose num_frames, height and width that give one."
        )
    x = latents.reshape(
        b, -1, f // patch_size_t, patch_size_t, h // patch_size, patch_size, w // patch_size, patch_size
    )
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_video(tokens: torch.Tensor, num_frames: int, height: int, width: int, patch_size=1, patch_size_t=1):
    """(B, S, D) -> (B, C, F, H, W), the inverse of `pack_video` (`num_frames`, `height`, `width`: the grid in
    patches), `LTXPipeline._unpack_latents`."""
    b = tokens.size(0)
    x = tokens.reshape(b, num_frames, height, width, -1, patch_size_t, patch_size, patch_size)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def rope_interpolation_scale(vae, frame_rate: float = DEFAULT_FRAME_RATE) -> tuple[float, float, float]:
    """LTXPipeline's `rope_interpolation_scale` for a VAE: (temporal_ratio / frame_rate, spatial, spatial)."""
    spatial, temporal = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    return (temporal / frame_rate, spatial, spatial)


class LTXPromptEncoding(MaskedPromptEncoding):
    """`LTXPipeline.encode_prompt`: T5 states and their padding mask (`encoder_hidden_states`,
    `encoder_attention_mask`), the negative prompt's (default: the empty prompt) for classifier-free guidance; the
    pipeline's `rope_interpolation_scale` at its default frame rate, one row per prompt."""

    def _states(self, prompts, negative, device, guidance, embeds):
        return self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=negative,
            do_classifier_free_guidance=guidance,
            device=device,
            **embeds,
        )

    def _encode(self, prompts, negative, device, guidance, embeds):
        cond, uncond = super()._encode(prompts, negative, device, guidance, embeds)
        scale = torch.tensor(rope_interpolation_scale(self.pipeline.vae), device=device, dtype=torch.float32)
        for part in [c for c in (cond, uncond) if c is not None]:
            part["rope_interpolation_scale"] = scale.expand(part["encoder_hidden_states"].shape[0], 3).clone()
        return cond, uncond


class LTXLatentCodec(VideoLatentCodec):
    """
    Videos (B, 3, F, H, W) in [-1, 1] to LTX's normalized latents x0 = (z - mean) * scaling_factor / std and back,
    with the VAE's `latents_mean` / `latents_std` buffers (LTXPipeline's `_normalize_latents` and
    `_denormalize_latents`) and its compression ratios (attributes of `AutoencoderKLLTXVideo`, not config entries).
    A VAE with `timestep_conditioning` decodes at timestep 0 (the pipeline's default `decode_timestep`).
    """

    def __init__(self, vae, sample: bool = True):
        super().__init__(vae, sample)
        mean, std = getattr(vae, "latents_mean", None), getattr(vae, "latents_std", None)  # None: a config alone
        self.latents_mean = None if mean is None else mean.detach().float().cpu()
        self.latents_std = None if std is None else std.detach().float().cpu()

    def _ratio(self, name: str, patch_key: str) -> int:
        """The VAE's compression ratio `name`, or (a config without it) as `AutoencoderKLLTXVideo` computes it:
        patch size times 2 per level that scales space and time."""
        value = getattr(self.vae, name, None) or self.vae.config.get(name)
        if value is None:
            config = self.vae.config
            value = config.get(patch_key, 1) * 2 ** sum(config.get("spatio_temporal_scaling", (True,) * 4))
        return int(value)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.get("latent_channels", 128))

    @property
    def scale_factor(self) -> int:
        return self._ratio("spatial_compression_ratio", "patch_size")

    @property
    def temporal_factor(self) -> int:
        return self._ratio("temporal_compression_ratio", "patch_size_t")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos (B, 3, F, H, W) in about [-1, 1] from latents x0 (B, C, F', h, w)."""
        mean, std = self._stats(latents)
        z = (latents * std / self.scaling_factor + mean).to(self.vae.dtype)
        timestep = None
        if self.vae.config.get("timestep_conditioning"):
            timestep = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        return self.vae.decode(z, timestep, return_dict=False)[0]


class LTXAdapter(NetworkAdapter):
    """`LTXVideoTransformer3DModel`: the 5-D latent packed into patch tokens, the grid size (in patches) and the
    conditioning's `rope_interpolation_scale` (B, 3) passed as LTXPipeline passes them; the time is the scheduler's
    (1000 s); the prediction unpacked to (B, C, F, H, W). The scale stays float32 for a half-precision network (the
    network computes its rotary positions in float32 from the pipeline's Python floats)."""

    text_width_keys = ("caption_channels",)

    @staticmethod
    def _scale_factors(scale, batch_size: int, device) -> tuple[torch.Tensor, ...]:
        """(B, 3) or (3,) -> three float32 factors of shape (B, 1, 1, 1, 1), which the network's rope multiplies
        into its (B, 1, F, H, W) position grids; a tuple, which `cast_floating` leaves as it is."""
        scale = torch.as_tensor(scale, device=device, dtype=torch.float32)
        scale = scale.expand(batch_size, 3) if scale.ndim == 1 else scale.float()
        return tuple(scale.t().reshape(3, -1, 1, 1, 1, 1))

    def __call__(self, model, sample, timestep, **conditioning):
        scale = conditioning.get("rope_interpolation_scale")
        if isinstance(scale, torch.Tensor):
            conditioning["rope_interpolation_scale"] = self._scale_factors(scale, sample.shape[0], sample.device)
        return super().__call__(model, sample, timestep, **conditioning)

    def inputs(self, model, sample, timestep, conditioning):
        config = model.config
        p, pt = config.patch_size, config.patch_size_t
        tokens = pack_video(sample, p, pt)
        _, _, f, h, w = sample.shape
        scale = conditioning.pop("rope_interpolation_scale", None)
        if isinstance(scale, torch.Tensor):
            scale = self._scale_factors(scale, sample.shape[0], sample.device)
        conditioning.update(num_frames=f // pt, height=h // p, width=w // p, rope_interpolation_scale=scale)
        return super().inputs(model, tokens, timestep, conditioning)

    def output(self, model, out, sample):
        config = model.config
        p, pt = config.patch_size, config.patch_size_t
        _, _, f, h, w = sample.shape
        return unpack_video(out, f // pt, h // p, w // p, p, pt)


register_adapter("LTXVideoTransformer3DModel", LTXAdapter())
register_family(Family("LTXPipeline", LTXPromptEncoding, codec=LTXLatentCodec, video=True, own_sampler="scheduler"))
