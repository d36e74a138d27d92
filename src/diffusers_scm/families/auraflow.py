"""AuraFlow (`AuraFlowPipeline`): a UMT5 text encoder and an MMDiT flow-matching transformer (SPEC.md section 8).

Prompts go through `AuraFlowPipeline.encode_prompt`: UMT5 embeddings padded to `max_sequence_length`
(`PromptEncoding.sequence_length`: the pipeline's 256, or the tokenizer's `model_max_length` where shorter), the
padded positions zeroed by the pipeline; the network reads the embeddings only (`encoder_hidden_states`, no mask).
The unconditional branch is the negative prompt (default: the empty prompt, as the pipeline's), combined linearly,
F_u + w (F_c - F_u). The network takes the flow time s = timestep / 1000 (`UnitTimeAdapter`, `diffusers_scm.adapters`,
as the pipeline passes `t / 1000`) and predicts the velocity n - x0 of the scheduler's flow matching.

Latents (`ScaledLatentCodec`): x0 = z * scaling_factor, as the pipeline decodes z = x0 / scaling_factor. Students
sample in `AuraFlowPipeline` too: it takes `sigmas=` (`FlowMatchLCMScheduler(shift=1.0)`, `guidance_scale=1`).
"""

from ..conditioning import PromptEncoding, ScaledLatentCodec
from . import Family, register_family


__all__ = ["AuraFlowPromptEncoding"]


class AuraFlowPromptEncoding(PromptEncoding):
    """AuraFlow: UMT5 embeddings (`encoder_hidden_states`), cond and negative from one `encode_prompt` call (its
    padding mask is needed with `prompt_embeds`, and the network does not read it)."""

    sequence_tokenizer = "tokenizer"
    embeds_with_prompt_embeds = ("prompt_attention_mask",)

    def _encode(self, prompts, negative, device, guidance, embeds):
        pe, _, npe, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt="" if negative is None else negative,
            do_classifier_free_guidance=guidance,
            device=device,
            **embeds,
        )
        return {"encoder_hidden_states": pe}, ({"encoder_hidden_states": npe} if guidance else None)


register_family(Family("AuraFlowPipeline", AuraFlowPromptEncoding, codec=ScaledLatentCodec))
