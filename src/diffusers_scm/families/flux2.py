"""FLUX.2: `Flux2Pipeline` (FLUX.2 [dev]: a Mistral-3 text encoder, guidance-distilled) and `Flux2KleinPipeline`
(FLUX.2 [klein]: a Qwen3 text encoder, true classifier-free guidance against the empty prompt), one network class,
`Flux2Transformer2DModel` (SPEC.md section 8).

Both pipelines hold their latents differently from Flux.1:

    z  = vae.encode(image).mode()                        (B, C, H/f, W/f)        C = 32 for the released VAE
    x0 = (patchify(z) - bn.running_mean) / sqrt(bn.running_var + eps)
                                                         (B, 4C, H/2f, W/2f)     128 channels, 2x2 patches
    tokens = x0 flattened row-major                      (B, H/2f * W/2f, 4C)    with 4-D position ids (0, row, col, 0)

The package's x0 is the patchified, batch-norm-normalized latent (B, 4C, h, w): what the pipelines' scheduler steps in
(before packing into tokens, which is a reshape). `Flux2LatentCodec` maps images in [-1, 1] to it and back exactly as
the pipelines' `_encode_vae_image` and their decode do; `Flux2Adapter` packs it into tokens for the network, with the
pipelines' own position ids for the image (`_prepare_latent_ids`) and the text (`_prepare_text_ids`), and passes the
flow time s (the pipelines call the network with `timestep / 1000`) and, for FLUX.2 [dev], the guidance input.

Guidance: FLUX.2 [dev] (`guidance_embeds=True`) takes the guidance value w as a network input (`--guidance_scale W`
feeds it, as for Flux.1-dev; no unconditional pass). Klein (`guidance_embeds=False`) is guided as its pipeline guides
it, F_u + w (F_c - F_u) with F_u the empty prompt's; a step-distilled Klein (`is_distilled`) is sampled by its pipeline
without guidance, so distill it (if at all) with `--guidance_scale 1`.

Sequence length: the pipelines' `max_sequence_length` (512), or the tokenizer's `model_max_length` where shorter (as
for every family). The pipelines read the text encoder's hidden states at `text_encoder_out_layers` (their defaults:
Mistral's 10, 20, 30; Qwen3's 9, 18, 27), which every encoding here uses.

Sampling a student in its own pipeline: both take `sigmas=` (`own_sampler="sigmas"`, `FlowMatchLCMScheduler`); their
empirical `mu` is ignored by a `FlowMatchLCMScheduler` without dynamic shifting (`shift=1.0`). One step gives the same
image as `SCMPipeline`; with two or more steps the re-noising noise is drawn in the pipeline's token layout
(B, tokens, 4C) rather than as (B, 4C, h, w), so the draws differ from `SCMPipeline`'s.
"""

import inspect

import torch

from ..adapters import UnitTimeAdapter, register_adapter
from ..conditioning import LatentCodec, PromptEncoding
from . import Family, register_family


__all__ = ["Flux2Adapter", "Flux2LatentCodec", "Flux2PromptEncoding"]


def _pipeline_class():
    from diffusers import Flux2Pipeline

    return Flux2Pipeline  # its static latent and position-id helpers (Klein's are copies of them)


class Flux2LatentCodec(LatentCodec):
    """
    Images in [-1, 1] to FLUX.2's x0 and back (SPEC.md section 8): the VAE latent's mode (or a draw), patchified 2x2
    into 4C channels and normalized by the VAE's batch-norm running statistics, x0 = (patchify(z) - mean) /
    sqrt(var + eps), as the pipelines' `_encode_vae_image`; decode inverts it and runs the VAE's decoder, as the
    pipelines do after their last step.

    Args:
        vae (`AutoencoderKLFlux2`): the pipeline's VAE (with its `bn` statistics).
        sample (`bool`, defaults to `True`): draw z from the latent distribution (else its mode).
    """

    @property
    def latent_channels(self) -> int:
        """Channels of x0: the 2x2 patches of the VAE's latent channels (the batch norm's features)."""
        return int(self.vae.bn.num_features)

    @property
    def scale_factor(self) -> int:
        """Pixels per x0 element: the VAE's downsampling times the 2x2 patch."""
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1) * 2

    def _batch_norm(self, like: torch.Tensor):
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config["batch_norm_eps"]).to(
            like.device, like.dtype
        )
        return mean, std

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 (B, 4C, H/2f, W/2f) of images (B, 3, H, W) in [-1, 1]; H and W multiples of `scale_factor`."""
        if images.shape[-1] % self.scale_factor or images.shape[-2] % self.scale_factor:
            raise ValueError(
                f"FLUX.2 images need a height and width that are multiples of {self.scale_factor} (the VAE's factor "
                f"times the 2x2 patch), got {tuple(images.shape[-2:])}: resize or crop them (`--resolution`)."
            )
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if self.sample else dist.mode()
        z = _pipeline_class()._patchify_latents(z.float())
        mean, std = self._batch_norm(z)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from x0 (B, 4C, h, w)."""
        mean, std = self._batch_norm(latents)
        z = _pipeline_class()._unpatchify_latents(latents * std + mean)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]


class Flux2Adapter(UnitTimeAdapter):
    """
    `Flux2Transformer2DModel` as `Flux2Pipeline` and `Flux2KleinPipeline` call it: x0-shaped samples (B, 4C, h, w)
    flattened row-major into tokens (B, h * w, 4C) and back, the 4-D position ids of the image (0, row, column, 0) and
    of the text (0, 0, 0, position) built as the pipelines build them when not given, the flow time s (`timestep /
    1000`), and `guidance` (FLUX.2 [dev]) one value per sample.
    """

    def inputs(self, model, sample, timestep, conditioning):
        if sample.ndim != 4:
            packed = " (a token sequence, as the family's own pipeline passes it)" if sample.ndim == 3 else ""
            raise ValueError(
                f"{type(model).__name__} takes the patchified latent (B, 4C, h, w) here, the state that training and "
                f"sampling carry; its adapter flattens it into tokens. Got shape {tuple(sample.shape)}{packed}: "
                "reshape it first, `tokens.permute(0, 2, 1).reshape(B, 4C, h, w)`."
            )
        pipeline = _pipeline_class()
        conditioning.setdefault("img_ids", pipeline._prepare_latent_ids(sample).to(sample.device))
        text = conditioning.get("encoder_hidden_states")
        if text is not None:
            conditioning.setdefault("txt_ids", pipeline._prepare_text_ids(text).to(sample.device))
        return super().inputs(model, pipeline._pack_latents(sample), timestep, conditioning)

    def output(self, model, out, sample):
        b, _, h, w = sample.shape
        return out[:, : h * w].permute(0, 2, 1).reshape(b, -1, h, w)


class Flux2PromptEncoding(PromptEncoding):
    """FLUX.2 [dev] and [klein]: the pipeline's `encode_prompt` (chat template, hidden states of three text-encoder
    layers stacked); the unconditional conditioning is the negative prompt (default: the empty prompt, as Klein's
    pipeline uses) encoded the same way. The text position ids are the adapter's."""

    sequence_tokenizer = "tokenizer"

    def sequence_length(self) -> int:
        """The pipeline's `max_sequence_length` default, or its tokenizer's `model_max_length` where shorter (the
        tokenizer of FLUX.2 [dev]'s processor)."""
        length = inspect.signature(type(self.pipeline).__call__).parameters["max_sequence_length"].default
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor: its text tokenizer
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < length:
            length = limit
        return length

    def _encode(self, prompts, negative, device, guidance, embeds):
        settings = {k: v for k, v in embeds.items() if not k.endswith("prompt_embeds")}  # max_sequence_length
        pe, _ = self.pipeline.encode_prompt(
            prompt=prompts, device=device, prompt_embeds=embeds.get("prompt_embeds"), **settings
        )
        cond = {"encoder_hidden_states": pe}
        if not guidance:
            return cond, None
        given = embeds.get("negative_prompt_embeds")
        if given is None:
            negative = negative if negative is not None else [""] * self.num_prompts
        npe, _ = self.pipeline.encode_prompt(
            prompt=None if given is not None else negative, device=device, prompt_embeds=given, **settings
        )
        return cond, {"encoder_hidden_states": npe}


register_adapter("Flux2Transformer2DModel", Flux2Adapter())
register_family(Family("Flux2Pipeline", Flux2PromptEncoding, codec=Flux2LatentCodec))
register_family(Family("Flux2KleinPipeline", Flux2PromptEncoding, codec=Flux2LatentCodec))
