"""HunyuanVideo and HunyuanVideo 1.5 (SPEC.md section 8).

`HunyuanVideoPipeline`: `HunyuanVideoTransformer3DModel`, a Llama text encoder (the hidden states three from the end,
after the pipeline's prompt template, with their padding mask) and a CLIP text encoder (`text_encoder_2`: its pooled
output as `pooled_projections`), `AutoencoderKLHunyuanVideo`. Latents: x0 = z * scaling_factor (0.476986), 5-D
(B, 16, F', H/8, W/8) with F' = (F - 1) / 4 + 1 (`VideoLatentCodec`; the pipeline's decode divides by the factor).
The released model is guidance-distilled as Flux.1-dev: no unconditional branch, the guidance value w is a network
input, `guidance = 1000 w` (the pipeline multiplies it; `HunyuanVideoAdapter` does). A student keeps the guidance
input (SPEC.md section 8); `--guidance_scale W` feeds it. Its `__call__` takes `sigmas=`: a student samples in it with
`FlowMatchLCMScheduler` (`own_sampler="sigmas"`, with `guidance_scale` the student's guidance value).

`HunyuanVideo15Pipeline`: `HunyuanVideo15Transformer3DModel`, a Qwen2.5-VL text model (hidden states three from the
end, after a chat template whose first 108 tokens are cropped) and a ByT5 encoder (`text_encoder_2`: the quoted text
of the prompt, "glyphs", zeros where there is none), `AutoencoderKLHunyuanVideo15` (x0 = z * scaling_factor, 16x
spatial and 4x temporal compression, 32 channels for the released VAE; `HunyuanVideo15LatentCodec` codes one video at
a time, as the VAE's attention takes batches of one). Text-to-video calls the network with the
latents concatenated with zero condition latents and a zero mask along the channels (2C + 1 inputs) and zero
`image_embeds` (729 tokens): `HunyuanVideo15Adapter` does. Its classifier-free guidance is the pipeline's `guider`
component (`ClassifierFreeGuidance`: F_u + w (F_c - F_u) against the empty prompt; w is the guider's
`guidance_scale`, which the teacher's `--guidance_scale W` replaces). Its `__call__` takes `sigmas=`
(`own_sampler="sigmas"`); a student samples without guidance: pass `guider=ClassifierFreeGuidance(guidance_scale=1.0)`
with the `FlowMatchLCMScheduler`.
"""

import torch

from ..adapters import NetworkAdapter, register_adapter
from ..conditioning import PromptEncoding, VideoLatentCodec
from . import Family, register_family


__all__ = [
    "HunyuanVideoPromptEncoding",
    "HunyuanVideo15PromptEncoding",
    "HunyuanVideo15LatentCodec",
    "HunyuanVideoAdapter",
    "HunyuanVideo15Adapter",
]

NUM_IMAGE_TOKENS = 729  # HunyuanVideo15Pipeline's `vision_num_semantic_tokens`: the zero image embeddings of t2v


class HunyuanVideoPromptEncoding(PromptEncoding):
    """`HunyuanVideoPipeline.encode_prompt` (its default prompt template): the Llama states and padding mask
    (`encoder_hidden_states`, `encoder_attention_mask`, as floats, as the pipeline casts it) and CLIP's pooled output
    (`pooled_projections`); the unconditional conditioning (for a teacher without guidance input) is the negative
    prompt (default: the empty prompt) encoded the same way, as the pipeline's `true_cfg_scale` path does."""

    sequence_tokenizer = "tokenizer"
    embeds_with_prompt_embeds = ("pooled_prompt_embeds", "prompt_attention_mask")
    embed_names = {
        "encoder_hidden_states": "prompt_embeds",
        "pooled_projections": "pooled_prompt_embeds",
        "encoder_attention_mask": "prompt_attention_mask",
    }

    def _one(self, prompts, device, embeds):
        pe, ppe, mask = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=device, **embeds)
        return {"encoder_hidden_states": pe, "encoder_attention_mask": mask.to(pe.dtype), "pooled_projections": ppe}

    def _encode(self, prompts, negative, device, guidance, embeds):
        positive = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        cond = self._one(prompts, device, positive)
        if not guidance:
            return cond, None
        given = {k[len("negative_") :]: v for k, v in embeds.items() if k.startswith("negative_")}
        if "max_sequence_length" in embeds:
            given["max_sequence_length"] = embeds["max_sequence_length"]
        if "prompt_embeds" not in given:
            negative = negative if negative is not None else [""] * self.num_prompts
        return cond, self._one(None if "prompt_embeds" in given else negative, device, given)


class HunyuanVideo15PromptEncoding(PromptEncoding):
    """`HunyuanVideo15Pipeline.encode_prompt`: the Qwen2.5-VL states and mask (`encoder_hidden_states`,
    `encoder_attention_mask`) and the ByT5 glyph states and mask (`encoder_hidden_states_2`,
    `encoder_attention_mask_2`); the negative prompt's (default: the empty prompt, as the pipeline's guider gets)
    for classifier-free guidance. Its sequence lengths are fixed by the pipeline (no `max_sequence_length`)."""

    embeds_with_prompt_embeds = ("prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
    embed_names = {
        "encoder_hidden_states": "prompt_embeds",
        "encoder_attention_mask": "prompt_embeds_mask",
        "encoder_hidden_states_2": "prompt_embeds_2",
        "encoder_attention_mask_2": "prompt_embeds_mask_2",
    }

    def _one(self, prompts, device, embeds):
        n = self.num_prompts
        pe, mask, pe2, mask2 = self.pipeline.encode_prompt(prompt=prompts, device=device, batch_size=n, **embeds)
        return {
            "encoder_hidden_states": pe,
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": pe2,
            "encoder_attention_mask_2": mask2,
        }

    def _encode(self, prompts, negative, device, guidance, embeds):
        positive = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        cond = self._one(prompts, device, positive)
        if not guidance:
            return cond, None
        given = {k[len("negative_") :]: v for k, v in embeds.items() if k.startswith("negative_")}
        return cond, self._one(None if given else negative, device, given)  # None: the pipeline's empty prompts


class HunyuanVideo15LatentCodec(VideoLatentCodec):
    """`VideoLatentCodec` (x0 = z * scaling_factor) that encodes and decodes one video at a time:
    `AutoencoderKLHunyuanVideo15`'s mid-block attention builds its causal mask as (B, L, L) against queries of
    (B, 1, L, C), which broadcasts only for B = 1 (diffusers 0.42), so a batch is split into single videos."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.cat([super(HunyuanVideo15LatentCodec, self).encode(v[None], generator) for v in images])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(HunyuanVideo15LatentCodec, self).decode(x[None]) for x in latents])


class HunyuanVideoAdapter(NetworkAdapter):
    """`HunyuanVideoTransformer3DModel`: time 1000 s as the scheduler gives it; the guidance value w of a
    guidance-distilled model is passed as 1000 w (HunyuanVideoPipeline multiplies it)."""

    text_width_keys = ("text_embed_dim",)

    def inputs(self, model, sample, timestep, conditioning):
        kwargs = super().inputs(model, sample, timestep, conditioning)
        if kwargs.get("guidance") is not None:
            kwargs["guidance"] = kwargs["guidance"] * 1000.0
        return kwargs


class HunyuanVideo15Adapter(NetworkAdapter):
    """`HunyuanVideo15Transformer3DModel` in text-to-video: the latents (B, C, F, H, W) concatenated with zero
    condition latents (C channels) and a zero mask (1 channel), and zero `image_embeds` (729 tokens of the
    network's `image_embed_dim`), as HunyuanVideo15Pipeline calls it; time 1000 s."""

    text_width_keys = ("text_embed_dim",)

    def unused_parameters(self, model):
        """The last block's text-stream output (`attn.to_add_out`, `ff_context`): the prediction reads the video
        stream (no single-stream blocks follow, unlike HunyuanVideo)."""
        last = f"transformer_blocks.{len(model.transformer_blocks) - 1}."
        return (last + "attn.to_add_out.", last + "ff_context.")

    def inputs(self, model, sample, timestep, conditioning):
        b, c, f, h, w = sample.shape
        zeros = sample.new_zeros((b, c + 1, f, h, w))
        conditioning.setdefault("image_embeds", sample.new_zeros((b, NUM_IMAGE_TOKENS, model.config.image_embed_dim)))
        return super().inputs(model, torch.cat([sample, zeros], dim=1), timestep, conditioning)


register_adapter("HunyuanVideoTransformer3DModel", HunyuanVideoAdapter())
register_adapter("HunyuanVideo15Transformer3DModel", HunyuanVideo15Adapter())
CLIP_LLAMA = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
register_family(
    Family(
        "HunyuanVideoPipeline",
        HunyuanVideoPromptEncoding,
        codec=VideoLatentCodec,
        video=True,
        own_sampler="sigmas",
        text_components=CLIP_LLAMA,
    )
)
register_family(
    Family(
        "HunyuanVideo15Pipeline",
        HunyuanVideo15PromptEncoding,
        codec=HunyuanVideo15LatentCodec,
        video=True,
        own_sampler="sigmas",
        text_components=CLIP_LLAMA,
        extra_components=("guider",),
    )
)
