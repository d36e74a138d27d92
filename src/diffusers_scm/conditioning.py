"""Conditioning of text-to-image and latent teachers (SPEC.md section 8): prompts through the family pipeline's own
`encode_prompt`, the unconditional (empty or negative prompt) embeddings for classifier-free guidance, guidance inputs,
and the VAE's latent scaling, each in one place.

    encoding = prompt_encoding(pipe)                   # pipe: the family's diffusers pipeline (text encoders loaded)
    cond, uncond = encoding.encode(["a red fox"], device=device)   # keyword conditioning for the network's adapter
    codec = LatentCodec(pipe.vae)
    x0 = codec.encode(images)                          # latents in the teacher's data space (TrigFlow x0)
    images = codec.decode(x0)

Families are declared in `diffusers_scm.families` (one module per family group), which names each one's
`PromptEncoding`; the first six (SD3, Flux.1, Sana, PixArt, SD 1.5, SDXL) have theirs here. Each `PromptEncoding`
subclass overrides one method: how the tuple that its pipeline's `encode_prompt` returns maps to the network's keyword
conditioning.

Sequence length: families whose `encode_prompt` takes `max_sequence_length` (SD3, Flux, Sana, PixArt) pad their long
text encoder's tokens to it. `PromptEncoding.sequence_length()` (`diffusers_scm.families.prompt_sequence_length(pipe)`) is the length every call uses: the pipeline's own
default, or the tokenizer's `model_max_length` where that is shorter (a teacher trained on short captions records its
length there, and is then conditioned on that many tokens everywhere; call the family's own pipeline with
that length to match). Released checkpoints keep the pipeline's default.
"""

import abc

import torch


__all__ = [
    "LatentCodec",
    "ScaledLatentCodec",
    "VideoLatentCodec",
    "PromptEncoding",
    "MaskedPromptEncoding",
    "check_tokenizers",
    "TEXT_COMPONENTS",
]

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
# Fewer tokens than this besides the special ones is no vocabulary: transformers' stand-in for a tokenizer whose files
# were not found (CLIP's has 2 tokens, T5's 1 besides its specials; a real one has at least its bytes or characters).
MIN_VOCABULARY = 8


def check_tokenizers(pipeline, source: str | None = None):
    """
    Check that each tokenizer of a loaded pipeline holds a vocabulary. `CLIPTokenizer.from_pretrained` of a folder
    without the tokenizer's files can return a stand-in with only its special tokens instead of raising, and a
    teacher would then train on prompts that all encode alike.

    Args:
        pipeline (`DiffusionPipeline`): the loaded pipeline (its `tokenizer`, `tokenizer_2`, `tokenizer_3`).
        source (`str`, *optional*): the folder or Hub id it was loaded from, for the error.

    Raises:
        `ValueError`: a tokenizer has fewer than `MIN_VOCABULARY` tokens besides its special tokens; it names the
            component.
    """
    source = source or type(pipeline).__name__
    for name in (n for n in TEXT_COMPONENTS if n.startswith("tokenizer")):
        tokenizer = getattr(pipeline, name, None)
        if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            continue
        special = set(getattr(tokenizer, "all_special_tokens", ()))
        words = [token for token in tokenizer.get_vocab() if token not in special]
        if len(words) < MIN_VOCABULARY:
            raise ValueError(
                f"{source}: the component {name!r} ({type(tokenizer).__name__}) loaded with {len(words)} tokens "
                f"besides its special tokens {sorted(special)}: no vocabulary, so its files were not found. Check "
                f"that {name}/ holds the tokenizer's files (tokenizer.json, or its vocabulary files such as "
                "vocab.json and merges.txt, or spiece.model), then save or download the pipeline again."
            )


class LatentCodec:
    """
    Images in [-1, 1] to the teacher's latents and back (SPEC.md section 8): x0 = (z - shift_factor) * scaling_factor,
    or (z - latents_mean) / latents_std for VAEs that carry them; decode inverts it.

    Args:
        vae (`AutoencoderKL`, `AutoencoderDC`, ...): the pipeline's VAE.
        sample (`bool`, defaults to `True`): draw z from the latent distribution (else its mode), where the VAE has one.
    """

    def __init__(self, vae, sample: bool = True):
        self.vae, self.sample = vae, sample
        config = vae.config
        self.scaling_factor = float(config.get("scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(config.get("shift_factor", 0.0) or 0.0)
        mean, std = config.get("latents_mean"), config.get("latents_std")
        self.latents_mean = None if mean is None else torch.tensor(mean)
        self.latents_std = None if std is None else torch.tensor(std)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.get("latent_channels", 4))

    @property
    def scale_factor(self) -> int:
        """Pixels per latent, from the VAE's number of resolution levels."""
        config = self.vae.config
        if config.get("block_out_channels") is not None and "encoder_block_types" not in config:
            return 2 ** (len(config["block_out_channels"]) - 1)
        return 2 ** (len(config.get("encoder_block_out_channels", [0])) - 1)

    def _stats(self, z):
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return self.latents_mean.reshape(shape).to(z), self.latents_std.reshape(shape).to(z)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents x0 (B, C, h, w) of images (B, 3, H, W) in [-1, 1]."""
        out = self.vae.encode(images.to(self.vae.device, self.vae.dtype))
        if hasattr(out, "latent_dist"):
            z = out.latent_dist.sample(generator) if self.sample else out.latent_dist.mode()
        else:  # AutoencoderDC: a deterministic latent
            z = out.latent if hasattr(out, "latent") else out[0]
        z = z.float()
        if self.latents_mean is not None and self.latents_std is not None:
            mean, std = self._stats(z)
            return (z - mean) / std * self.scaling_factor
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from latents x0."""
        if self.latents_mean is not None and self.latents_std is not None:
            mean, std = self._stats(latents)
            z = latents / self.scaling_factor * std + mean
        else:
            z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]


class ScaledLatentCodec(LatentCodec):
    """x0 = z * scaling_factor and back (SPEC.md section 8): the VAE's `shift_factor` and latent statistics are not
    used, as CogView4's and AuraFlow's pipelines decode z = x0 / scaling_factor."""

    def __init__(self, vae, sample: bool = True):
        super().__init__(vae, sample)
        self.shift_factor = 0.0
        self.latents_mean = self.latents_std = None


class VideoLatentCodec(LatentCodec):
    """
    Videos (B, 3, F, H, W) in [-1, 1] to the teacher's 5-D latents x0 (B, C, F', h, w) and back, for video VAEs that
    compress time causally (the first frame alone, then `temporal_factor` frames per latent frame: F' = (F - 1) /
    temporal_factor + 1, so F must be temporal_factor k + 1). The normalization is `LatentCodec`'s (per-channel
    `latents_mean` / `latents_std` where the VAE's config has them, as WanPipeline's decode inverts them; else the
    scaling and shift factors). Shared by the video families (`Family(video=True)`); a family whose pipeline
    normalizes or packs its latents otherwise subclasses it.

    The VAE's config names its factors: `z_dim` or `latent_channels`; `scale_factor_spatial` or
    `spatial_compression_ratio`; `scale_factor_temporal` or `temporal_compression_ratio`.
    """

    @property
    def latent_channels(self) -> int:
        config = self.vae.config
        return int(config.get("z_dim") or config.get("latent_channels") or 4)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent, in height and width."""
        config = self.vae.config
        return int(config.get("scale_factor_spatial") or config.get("spatial_compression_ratio") or 8)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first)."""
        config = self.vae.config
        return int(config.get("scale_factor_temporal") or config.get("temporal_compression_ratio") or 4)

    def check_num_frames(self, num_frames: int, where: str = "") -> int:
        """`num_frames` if the VAE encodes it whole (temporal_factor k + 1 frames), else a `ValueError` naming the
        nearest counts that it does (`where`: what the count belongs to, for the error)."""
        k = self.temporal_factor
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"{where}num_frames must be a positive integer, got {num_frames!r}.")
        if (num_frames - 1) % k:
            lower = (num_frames - 1) // k * k + 1
            raise ValueError(
                f"{where}{num_frames} frames: {type(self.vae).__name__} encodes {k}k + 1 frames (the first alone, then "
                f"{k} per latent frame). Use {lower} or {lower + k} frames (--num_frames / num_frames)."
            )
        return num_frames

    def latent_frames(self, num_frames: int) -> int:
        """F' latent frames of `num_frames` frames."""
        return (self.check_num_frames(num_frames) - 1) // self.temporal_factor + 1

    def latent_shape(self, batch_size: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """(B, C, F', h, w) of `batch_size` videos of `num_frames` frames of height x width pixels."""
        factor = self.scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"`height` and `width` must be multiples of {factor} (the VAE's scale), got {height}x{width}."
            )
        return (batch_size, self.latent_channels, self.latent_frames(num_frames), height // factor, width // factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents x0 (B, C, F', h, w) of videos (B, 3, F, H, W) in [-1, 1]."""
        if images.ndim != 5:
            raise ValueError(
                f"{type(self.vae).__name__} encodes videos (B, 3, F, H, W), got a tensor of shape {tuple(images.shape)}."
            )
        self.check_num_frames(int(images.shape[2]))
        return super().encode(images, generator)


class PromptEncoding(abc.ABC):
    """
    Prompts to the network's keyword conditioning through the family pipeline's own `encode_prompt` (never rewritten
    per family). Subclasses override `_encode`.

    Args:
        pipeline (`DiffusionPipeline`): the family's pipeline with its text encoders and tokenizers.
    """

    sequence_tokenizer: str | None = None  # the component whose tokens `max_sequence_length` pads (see the module)
    # what the family's encode_prompt needs besides `prompt_embeds` when it is given instead of prompts
    embeds_with_prompt_embeds: tuple[str, ...] = ()
    # the network's conditioning keyword -> the `encode_prompt` input it is taken from when given
    embed_names = {"encoder_hidden_states": "prompt_embeds"}

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @abc.abstractmethod
    def _encode(self, prompts, negative, device, guidance: bool, embeds: dict) -> tuple[dict, dict | None]:
        """The family's `encode_prompt` call; `embeds`: precomputed `prompt_embeds=`-style inputs passed to it."""

    @torch.no_grad()
    def encode(
        self,
        prompts: list[str] | str | None,
        negative_prompts: list[str] | str | None = None,
        device=None,
        guidance: bool = True,
        height: int | None = None,
        width: int | None = None,
        **embeds,
    ) -> tuple[dict, dict | None]:
        """
        `(cond, uncond)`: the conditioning of `prompts` and, with `guidance`, of the negative prompts (default: the
        empty prompt) for classifier-free guidance (None without). `height`/`width` (pixels) are the image size for
        families that condition on it (SDXL's micro-conditioning). `embeds`: precomputed inputs of the family's
        `encode_prompt` (`prompt_embeds`, `pooled_prompt_embeds`, `prompt_attention_mask`, ...) instead of prompts.
        """
        if prompts is None and embeds.get("prompt_embeds") is None:
            raise ValueError("Pass `prompt` (a string or a list) or `prompt_embeds`.")
        self._check_embeds(prompts, guidance, embeds)
        n = embeds["prompt_embeds"].shape[0] if prompts is None else (1 if isinstance(prompts, str) else len(prompts))
        prompts = None if prompts is None else ([prompts] if isinstance(prompts, str) else list(prompts))
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * n
        if negative_prompts is not None and len(negative_prompts) != n:  # None: the family's default (empty prompt)
            raise ValueError(f"Got {len(negative_prompts)} negative prompts for {n} prompts.")
        if any(k.startswith("negative_") for k in embeds):
            negative_prompts = None  # the family's encode_prompt takes the negative embeddings as given
        self.height, self.width = height, width
        device = device or self.pipeline._execution_device
        self.num_prompts = n
        embeds = {k: v for k, v in embeds.items() if v is not None}
        length = self.sequence_length()
        if length is not None and "max_sequence_length" not in embeds:
            embeds["max_sequence_length"] = length
        return self._encode(prompts, negative_prompts, device, guidance, embeds)

    def sequence_length(self) -> int | None:
        """
        The `max_sequence_length` of the family's prompts (see the module docstring): its pipeline's `__call__`
        default, or its long tokenizer's `model_max_length` where shorter; None for families without the argument
        (SD, SDXL).
        """
        import inspect

        parameter = inspect.signature(type(self.pipeline).__call__).parameters.get("max_sequence_length")
        if parameter is None or self.sequence_tokenizer is None:
            return None
        length = parameter.default
        tokenizer = getattr(self.pipeline, self.sequence_tokenizer, None)
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < length:
            length = limit
        return length

    def _check_embeds(self, prompts, guidance: bool, embeds: dict):
        """The embeddings that the family's `encode_prompt` needs together (its pooled embeddings or padding mask
        with `prompt_embeds`, and the same for the negative branch): a missing one is named here, not met as `None`
        deep inside diffusers."""
        groups = [("", prompts is None)]
        groups.append(("negative_", guidance and embeds.get("negative_prompt_embeds") is not None))
        family = type(self.pipeline).__name__
        for prefix, given in groups:
            missing = [f"`{prefix}{k}`" for k in self.embeds_with_prompt_embeds if embeds.get(prefix + k) is None]
            if given and missing:
                raise ValueError(
                    f"{family}'s `encode_prompt` needs {' and '.join(missing)} with `{prefix}prompt_embeds`: pass "
                    f"them as it returns them (`{family}.encode_prompt`), or pass `{prefix}prompt` instead."
                )


class SD3PromptEncoding(PromptEncoding):
    sequence_tokenizer = "tokenizer_3"
    embeds_with_prompt_embeds = ("pooled_prompt_embeds",)
    embed_names = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds"}

    def _encode(self, prompts, negative, device, guidance, embeds):
        pe, npe, ppe, nppe = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative,
            **embeds,
        )
        cond = {"encoder_hidden_states": pe, "pooled_projections": ppe}
        return cond, ({"encoder_hidden_states": npe, "pooled_projections": nppe} if guidance else None)


class FluxPromptEncoding(PromptEncoding):
    """Flux.1: no negative branch in the guidance-distilled model; the unconditional conditioning (true CFG) is the
    negative prompt encoded the same way."""

    sequence_tokenizer = "tokenizer_2"
    embeds_with_prompt_embeds = ("pooled_prompt_embeds",)
    embed_names = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds"}

    def _encode(self, prompts, negative, device, guidance, embeds):
        positive = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        pe, ppe, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=device, **positive)
        cond = {"encoder_hidden_states": pe, "pooled_projections": ppe}
        if not guidance:
            return cond, None
        given = {k[len("negative_") :]: v for k, v in embeds.items() if k.startswith("negative_")}
        if not given:
            negative = negative if negative is not None else [""] * self.num_prompts
        npe, nppe, _ = self.pipeline.encode_prompt(
            prompt=None if given else negative, prompt_2=None, device=device, **given
        )
        return cond, {"encoder_hidden_states": npe, "pooled_projections": nppe}


class MaskedPromptEncoding(PromptEncoding):
    """
    Families whose `encode_prompt` gives the text states with their padding mask, and the negative prompt's, in one
    call: the network reads them as `encoder_hidden_states` and `encoder_attention_mask`. Subclasses override
    `_states` (the call, returning `(states, mask, negative_states, negative_mask)`).
    """

    sequence_tokenizer = "tokenizer"
    embeds_with_prompt_embeds = ("prompt_attention_mask",)
    embed_names = {"encoder_hidden_states": "prompt_embeds", "encoder_attention_mask": "prompt_attention_mask"}

    @abc.abstractmethod
    def _states(self, prompts, negative, device, guidance, embeds) -> tuple:
        """The family's `encode_prompt` call: `(states, mask, negative_states, negative_mask)`."""

    def _encode(self, prompts, negative, device, guidance, embeds):
        pe, mask, npe, nmask = self._states(prompts, negative, device, guidance, embeds)
        cond = {"encoder_hidden_states": pe, "encoder_attention_mask": mask}
        return cond, ({"encoder_hidden_states": npe, "encoder_attention_mask": nmask} if guidance else None)


class MaskedT5PromptEncoding(MaskedPromptEncoding):
    """Sana and PixArt: embeddings with a padding mask, `encoder_attention_mask`."""

    embed_names = {"encoder_hidden_states": "prompt_embeds"}

    def _states(self, prompts, negative, device, guidance, embeds):
        return self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=guidance,
            negative_prompt="" if negative is None else negative,
            device=device,
            clean_caption=False,
            **embeds,
        )


class SanaPromptEncoding(MaskedT5PromptEncoding):
    """Sana: prompts get the pipeline's default `complex_human_instruction`, as its `__call__` gives them."""

    def _encode(self, prompts, negative, device, guidance, embeds):
        import inspect

        default = inspect.signature(type(self.pipeline).__call__).parameters.get("complex_human_instruction")
        if default is not None and "complex_human_instruction" not in embeds and prompts is not None:
            embeds = {**embeds, "complex_human_instruction": default.default}
        return super()._encode(prompts, negative, device, guidance, embeds)


class SDPromptEncoding(PromptEncoding):
    def _encode(self, prompts, negative, device, guidance, embeds):
        pe, npe = self.pipeline.encode_prompt(prompts, device, 1, guidance, negative_prompt=negative, **embeds)
        return {"encoder_hidden_states": pe}, ({"encoder_hidden_states": npe} if guidance else None)


class SDXLPromptEncoding(PromptEncoding):
    """SDXL: pooled text embeddings and the size micro-conditioning (`time_ids`) in `added_cond_kwargs`."""

    embeds_with_prompt_embeds = ("pooled_prompt_embeds",)

    def _encode(self, prompts, negative, device, guidance, embeds):
        pipe = self.pipeline
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompts, device=device, do_classifier_free_guidance=guidance, negative_prompt=negative, **embeds
        )
        size_default = pipe.default_sample_size * pipe.vae_scale_factor
        size = (self.height or size_default, self.width or size_default)
        projection = int(ppe.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=projection)
        time_ids = time_ids.to(device).repeat(pe.shape[0], 1)
        cond = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": ppe, "time_ids": time_ids}}
        if not guidance:
            return cond, None
        return cond, {"encoder_hidden_states": npe, "added_cond_kwargs": {"text_embeds": nppe, "time_ids": time_ids}}
