"""Qwen-Image (`QwenImagePipeline`): a Qwen2.5-VL text encoder behind a chat template, packed 2x2 tokens, a video
VAE (`AutoencoderKLQwenImage`, one frame) with per-channel latent statistics, and true classifier-free guidance
with a norm rescale (SPEC.md section 8).

Prompts go through `QwenImagePipeline.encode_prompt`, which runs the text encoder on the templated prompt, drops the
template's system part and pads the batch to its longest prompt (its mask is None when nothing is padded). Here the
embeddings are then padded with zeros to the fixed `max_sequence_length` (`PromptEncoding.sequence_length`: the
pipeline's default 512, or the tokenizer's `model_max_length` less the template's `prompt_template_encode_start_idx`
tokens where shorter) and always carry their mask, `encoder_hidden_states_mask`, so that every batch and the latent
cache hold one shape. The network's output does not change: its attention masks the padded tokens, and its text
RoPE positions count from the first text token whatever the padded length (`QwenEmbedRope`). The cost is attention
over the padded text tokens (at most `max_sequence_length`).

Guidance: the pipeline's `true_cfg_scale` combines the two predictions as comb = raw_u + w (raw_c - raw_u) and then
rescales comb, per packed token, to the norm of raw_c: comb * |raw_c| / |comb| (the norm over the token's 4C
channels). `QwenImageAdapter.guide` (`diffusers_scm.adapters`) does the same, and the teacher's guided velocity
(`TrigFlowDenoiser.guided`) applies it to the raw predictions before converting to TrigFlow, so a student distills
the ODE that `QwenImagePipeline(true_cfg_scale=w, negative_prompt=...)` samples. The unconditional branch is the
negative prompt (default: the empty prompt; the pipeline guides only when given one).

Latents (`QwenImageCodec`): images (B, 3, H, W) get the VAE's frame axis, (B, 3, 1, H, W); x0 = (z - latents_mean) /
latents_std of the single latent frame, (B, z_dim, H/8, W/8), as the pipeline's img2img encode; decode inverts it
and drops the frame axis, as `QwenImagePipeline.__call__`. Students sample in `QwenImagePipeline` too (it takes
`sigmas=`; without a negative prompt it runs one network call per step).
"""

import torch

from ..conditioning import LatentCodec, PromptEncoding
from . import Family, register_family


__all__ = ["QwenImagePromptEncoding", "QwenImageCodec"]


class QwenImagePromptEncoding(PromptEncoding):
    """Qwen-Image: Qwen2.5-VL embeddings of the templated prompt, padded to `sequence_length()` with their mask
    (`encoder_hidden_states_mask`); cond and negative from two `encode_prompt` calls, as the pipeline makes them."""

    sequence_tokenizer = "tokenizer"
    embed_names = {"encoder_hidden_states": "prompt_embeds", "encoder_hidden_states_mask": "prompt_embeds_mask"}

    def sequence_length(self) -> int | None:
        """The pipeline's `max_sequence_length` default (512), or the tokenizer's `model_max_length` less the
        template tokens that `encode_prompt` drops (`prompt_template_encode_start_idx`), where that is shorter."""
        import inspect

        length = inspect.signature(type(self.pipeline).__call__).parameters["max_sequence_length"].default
        limit = getattr(getattr(self.pipeline, "tokenizer", None), "model_max_length", None)
        drop = int(getattr(self.pipeline, "prompt_template_encode_start_idx", 0))
        if isinstance(limit, int) and 0 < limit - drop < length:
            length = limit - drop
        return length

    def _padded(self, embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> dict:
        """The embeddings (B, L, D) padded with zeros to (B, length, D), and their mask (B, length) (1: a token)."""
        b, n, _ = embeds.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        pad = max(length - n, 0)
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def _encode(self, prompts, negative, device, guidance, embeds):
        length = embeds.pop("max_sequence_length", None) or self.sequence_length()
        positive = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        pe, mask = self.pipeline.encode_prompt(prompt=prompts, device=device, max_sequence_length=length, **positive)
        cond = self._padded(pe, mask, length)
        if not guidance:
            return cond, None
        given = {k[len("negative_") :]: v for k, v in embeds.items() if k.startswith("negative_")}
        if not given:
            negative = negative if negative is not None else [""] * self.num_prompts
        npe, nmask = self.pipeline.encode_prompt(
            prompt=None if given else negative, device=device, max_sequence_length=length, **given
        )
        return cond, self._padded(npe, nmask, length)


class QwenImageCodec(LatentCodec):
    """`AutoencoderKLQwenImage` (a video VAE) on images: a frame axis of one frame around `LatentCodec`'s encode and
    decode, x0 = (z - latents_mean) / latents_std (SPEC.md section 8; the VAE has no scaling factor), as
    `QwenImagePipeline` and its img2img pipeline."""

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent: 2 per entry of `temperal_downsample` (the pipeline's `vae_scale_factor`)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents x0 (B, z_dim, h, w) of images (B, 3, H, W) in [-1, 1]."""
        return super().encode(images[:, :, None], generator)[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in about [-1, 1] from latents x0 (B, z_dim, h, w)."""
        return super().decode(latents[:, :, None])[:, :, 0]


register_family(Family("QwenImagePipeline", QwenImagePromptEncoding, codec=QwenImageCodec))
