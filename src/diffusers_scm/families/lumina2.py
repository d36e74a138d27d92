"""Lumina-Image 2.0 (`Lumina2Pipeline`): a Gemma-2 text encoder behind a system prompt, a flow-matching DiT that
takes the reversed time and predicts the negated velocity, and classifier-free guidance with a norm rescale
(SPEC.md section 8).

Prompts go through `Lumina2Pipeline.encode_prompt`, which puts the pipeline's `system_prompt` and " <Prompt Start> "
before every prompt (not before the negative prompt) and pads Gemma's tokens to `max_sequence_length`
(`PromptEncoding.sequence_length`: the pipeline's default 256, or the tokenizer's `model_max_length` where shorter);
the network reads the second-to-last hidden states and their padding mask, `encoder_attention_mask`. The
unconditional branch is the negative prompt (default: the empty prompt, as the pipeline's).

Time and prediction (`Lumina2Adapter`, `diffusers_scm.adapters`): the pipeline's scheduler is flow matching, x_s =
(1 - s) x0 + s n with timesteps 1000 s, but the network takes 1 - s (data at 1) and predicts x0 - n, which the
pipeline negates before `scheduler.step`. The adapter passes 1 - timestep / 1000 and negates the output, so the
teacher is the pipeline's flow-matching model.

Guidance (`Lumina2Adapter.guide`): `Lumina2Pipeline.__call__`
combines comb = raw_u + w (raw_c - raw_u) and, with its default `cfg_normalization=True`, rescales comb to the norm of
raw_c, the norms taken over the last axis of the latent image (its width: comb * |raw_c| / |comb| per channel and
row). Its other option, `cfg_trunc_ratio` (default 1.0), drops guidance in the last steps of a sampling run; at its
default it never does, and a time-independent teacher cannot depend on the position in a run, so the teacher
guides at every time, as the pipeline at its defaults. The rescale is odd in the predictions, so it gives the same
on the negated outputs of the adapter. A student distills the ODE that `Lumina2Pipeline(guidance_scale=w)` samples.

Latents: x0 = (z - shift_factor) * scaling_factor (`LatentCodec`), as the pipeline decodes; its `vae_scale_factor`
is 8 whatever the VAE. Students sample in `Lumina2Pipeline` too: it takes `sigmas=` and steps
`FlowMatchLCMScheduler(shift=1.0)` on the negated network output, the flow velocity n - x0 (`guidance_scale=1`).
"""

from ..conditioning import MaskedPromptEncoding
from . import Family, register_family


__all__ = ["Lumina2PromptEncoding"]


class Lumina2PromptEncoding(MaskedPromptEncoding):
    """Lumina 2: Gemma-2 embeddings of the system prompt and the prompt, with their padding mask
    (`encoder_attention_mask`); cond and negative from one `encode_prompt` call."""

    def _states(self, prompts, negative, device, guidance, embeds):
        return self.pipeline.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative,
            device=device,
            **embeds,
        )


register_family(Family("Lumina2Pipeline", Lumina2PromptEncoding))
