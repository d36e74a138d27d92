"""Chroma (`ChromaPipeline`): Flux's packed 2x2 tokens and VAE, one T5 text encoder with a padding mask, and true
classifier-free guidance against a negative prompt (SPEC.md section 8).

Prompts go through `ChromaPipeline.encode_prompt`: T5 embeddings padded to `max_sequence_length` and the pipeline's
text mask (its prompt tokens and one padding token after them, in the text encoder's dtype), given to the network as
`encoder_attention_mask`; `ChromaAdapter` (`diffusers_scm.adapters`) extends it with the image tokens into the joint
`attention_mask` as the pipeline's `_prepare_attention_mask` does, and builds Flux's position ids. The unconditional
branch is the negative prompt (default: the empty prompt, as the pipeline's), combined as the pipeline does,
F_u + w (F_c - F_u). The latents are Flux's, `(z - shift_factor) * scaling_factor` (`LatentCodec`). Students sample
in `ChromaPipeline` too: it takes `sigmas=` (`FlowMatchLCMScheduler`).
"""

from ..conditioning import MaskedPromptEncoding
from . import Family, register_family


__all__ = ["ChromaPromptEncoding"]


class ChromaPromptEncoding(MaskedPromptEncoding):
    """Chroma: T5 embeddings and the pipeline's text mask (`encoder_attention_mask`), cond and negative from one
    `encode_prompt` call."""

    def _states(self, prompts, negative, device, guidance, embeds):
        pe, _, mask, npe, _, nmask = self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=negative,
            device=device,
            do_classifier_free_guidance=guidance,
            **embeds,
        )
        return pe, mask, npe, nmask


register_family(Family("ChromaPipeline", ChromaPromptEncoding))
