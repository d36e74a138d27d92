"""CogView4 (`CogView4Pipeline`): a GLM-4 text encoder, a flow-matching DiT conditioned on the image size, whose
time input is the scheduler's time before its resolution-dependent shift (SPEC.md section 8).

Prompts go through `CogView4Pipeline.encode_prompt`: GLM's second-to-last hidden states of the prompts, padded to the
batch's longest prompt and then on the left (with the pad token, which the text encoder reads) to a multiple of 16
tokens. The network reads no text mask. The conditioning adds the size micro-conditioning that the pipeline passes,
`original_size` = `target_size` = (height, width) in pixels and `crop_coords` = (0, 0) (the pipeline's defaults), for
the image size the encoding is given (`PromptEncoding.encode(height=, width=)`; training passes `--resolution`). The
unconditional branch is the negative prompt (default: the empty prompt, as the pipeline's). Sequence length: every
call truncates at `max_sequence_length` (`PromptEncoding.sequence_length`: the pipeline's 1024, or the tokenizer's
`model_max_length` where shorter); as in the pipeline, a batch is as long as its longest prompt (a multiple of 16), so
the latent cache holds rows of one length only when every caption pads to the same multiple of 16 (a tokenizer
`model_max_length` of 16 makes every prompt 16 tokens).

Time (`CogView4Adapter`): the pipeline's scheduler (FlowMatchEuler with dynamic shifting, `time_shift_type="linear"`)
makes the flow times s_i = shift(u_i) of an unshifted grid u_i, but passes the network 1000 u_i, not 1000 s_i. The
shift is s = m u / (1 + (m - 1) u) with m = mu (linear time shift; exp(mu) for the exponential one; the static
`shift` without dynamic shifting), mu = sqrt(L / base_image_seq_len) max_shift + base_shift from the number L of
image tokens (the pipeline's `calculate_shift`). So the teacher is flow matching in s (timesteps 1000 s, the
parameterization that the scheduler gives) and its adapter passes the network

    1000 u = 1000 s / (s + m (1 - s)),   m from the latent size of the sample.

The scheduler settings are recorded in the network's config (`_time_shift`) when the teacher is loaded
(`Family.teacher_network`), so that a student, a copy of it, keeps the teacher's time map; a network without the
record uses the released CogView4-6B settings (those `CogView4Pipeline` falls back to).

Latents (`ScaledLatentCodec`): x0 = z * scaling_factor, as the pipeline decodes z = x0 / scaling_factor (it reads no
`shift_factor`). Students sample in `CogView4Pipeline` too, which takes `sigmas=` and `timesteps=` (its network
times): `cogview4_sampling_kwargs` gives both for `FlowMatchLCMScheduler(shift=1.0)`. The pipeline truncates the
`timesteps` it is given to integers (they are rounded here first), so a 2-step run matches `SCMPipeline` exactly
where the intermediate network time is an integer (as the 1-step time, 1000), and otherwise to within that rounding
(< 0.5 of 1000).
"""

import math

import torch

from ..adapters import NetworkAdapter, register_adapter
from ..conditioning import PromptEncoding, ScaledLatentCodec
from . import Family, register_family


__all__ = [
    "CogView4PromptEncoding",
    "CogView4Adapter",
    "cogview4_sampling_kwargs",
    "record_time_shift",
    "RELEASED_TIME_SHIFT",
]

# THUDM/CogView4-6B's scheduler settings, and the defaults `CogView4Pipeline` reads for missing ones
RELEASED_TIME_SHIFT = {
    "use_dynamic_shifting": True,
    "time_shift_type": "linear",
    "base_image_seq_len": 256,
    "base_shift": 0.25,
    "max_shift": 0.75,
    "shift": 1.0,
}
_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


class CogView4PromptEncoding(PromptEncoding):
    """CogView4: GLM embeddings (`encoder_hidden_states`) and the size micro-conditioning (`original_size`,
    `target_size`, `crop_coords`) of the image size given to `encode` (else the pipeline's default size)."""

    sequence_tokenizer = "tokenizer"

    def _size(self, batch: int, dtype, device) -> dict:
        pipe = self.pipeline
        default = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        size = [float(self.height or default), float(self.width or default)]
        rows = {"original_size": size, "target_size": size, "crop_coords": [0.0, 0.0]}  # the pipeline's defaults
        return {k: torch.tensor([v], dtype=dtype, device=device).repeat(batch, 1) for k, v in rows.items()}

    def _encode(self, prompts, negative, device, guidance, embeds):
        pe, npe = self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=negative,
            do_classifier_free_guidance=guidance,
            device=device,
            **embeds,
        )
        cond = {"encoder_hidden_states": pe, **self._size(pe.shape[0], pe.dtype, device)}
        if not guidance:
            return cond, None
        return cond, {"encoder_hidden_states": npe, **self._size(npe.shape[0], npe.dtype, device)}


def record_time_shift(pipeline):
    """
    The teacher network of a loaded `CogView4Pipeline` (`Family.teacher_network`): its transformer, with the time
    shift settings of the pipeline's flow-matching scheduler recorded in its config (`_time_shift`), which
    `CogView4Adapter` reads and a student copied from it keeps. A pipeline with another scheduler (a student's)
    leaves the record as it is.

    Raises:
        `ValueError`: the scheduler bends its times in a way that is not a shift of the pipeline's network time
            (`shift_terminal`, Karras / exponential / beta sigmas, inverted sigmas).
    """
    network, config = pipeline.transformer, dict(pipeline.scheduler.config)
    if network is None or "use_dynamic_shifting" not in config:
        return network
    bent = [k for k in _UNSUPPORTED if config.get(k)]
    if bent:
        raise ValueError(
            f"CogView4's scheduler has {', '.join(bent)} set: its network time is then not a shift of the flow time "
            "that this package can invert. Use the released scheduler settings (FlowMatchEulerDiscreteScheduler with "
            "use_dynamic_shifting=True, time_shift_type='linear')."
        )
    record = {k: config.get(k, v) for k, v in RELEASED_TIME_SHIFT.items()}
    network.register_to_config(_time_shift=record)
    return network


class CogView4Adapter(NetworkAdapter):
    """CogView4Transformer2DModel: the network time 1000 u = 1000 s / (s + m (1 - s)) from the flow time s =
    timestep / 1000, m the pipeline's time shift at the sample's latent size (see the module docstring)."""

    text_width_keys = ("text_embed_dim",)

    @staticmethod
    def shift_factor(model, latent_height: int, latent_width: int) -> float:
        """m of s = m u / (1 + (m - 1) u) for latents of this size (the network's recorded scheduler settings, else
        the released ones), as `CogView4Pipeline.__call__` computes mu (`calculate_shift`)."""
        settings = {**RELEASED_TIME_SHIFT, **(model.config.get("_time_shift") or {})}
        if not settings["use_dynamic_shifting"]:
            return float(settings["shift"])
        tokens = latent_height * latent_width // model.config.patch_size**2
        mu = math.sqrt(tokens / settings["base_image_seq_len"]) * settings["max_shift"] + settings["base_shift"]
        return math.exp(mu) if settings["time_shift_type"] == "exponential" else mu

    def network_time(self, model, timestep, shift: float = 1.0):
        s = timestep.double() / 1000
        return (1000 * s / (s + shift * (1 - s))).to(timestep.dtype)

    def inputs(self, model, sample, timestep, conditioning):
        shift = self.shift_factor(model, *sample.shape[-2:])
        return {"hidden_states": sample, "timestep": self.network_time(model, timestep, shift), **conditioning}


def cogview4_sampling_kwargs(pipeline, scheduler, num_inference_steps: int, height: int, width: int) -> dict:
    """
    `sigmas=` and `timesteps=` with which `CogView4Pipeline` (with `FlowMatchLCMScheduler(shift=1.0)`) samples a
    flow-matching student at the times of its consistency `scheduler` (`TrigFlowScheduler`): the flow times
    (`scheduler.flow_sigmas`) and the network times of `CogView4Adapter` at this image size, rounded to the nearest
    integer (the pipeline truncates the `timesteps` it is given to integers; see the module docstring).
    """
    sigmas = scheduler.flow_sigmas(num_inference_steps)
    factor = pipeline.vae_scale_factor
    shift = CogView4Adapter.shift_factor(pipeline.transformer, height // factor, width // factor)
    timesteps = CogView4Adapter().network_time(None, torch.tensor(sigmas, dtype=torch.float64) * 1000, shift)
    return {"sigmas": sigmas, "timesteps": timesteps.round().tolist()}


register_adapter("CogView4Transformer2DModel", CogView4Adapter())
register_family(
    Family("CogView4Pipeline", CogView4PromptEncoding, codec=ScaledLatentCodec, teacher_network=record_time_shift)
)
