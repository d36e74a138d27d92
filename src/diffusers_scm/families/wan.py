"""Wan 2.1 and Wan 2.2: `WanPipeline` (text-to-video), `WanTransformer3DModel`, a UMT5 text encoder and
`AutoencoderKLWan` (SPEC.md section 8).

Latents: x0 = (z - latents_mean) / latents_std per channel, 5-D (B, 16, F', H/8, W/8) with F' = (F - 1) / 4 + 1
(`VideoLatentCodec`, as WanPipeline's decode inverts it); videos must have 4k + 1 frames.

Network call: the pipeline passes the latents and `timestep = 1000 s` (flow matching, shifted by its scheduler) with
`encoder_hidden_states`, the UMT5 states with their padding zeroed (`WanPipeline.encode_prompt`); classifier-free
guidance against the negative prompt (the empty one by default), F_u + w (F_c - F_u).

Wan 2.2 (A14B) has two experts of one architecture: `transformer` (high noise) for timesteps t >= boundary_ratio *
num_train_timesteps and `transformer_2` (low noise) below, each called with the pipeline's guidance (`guidance_scale`
and `guidance_scale_2`, which defaults to it). The teacher here is both experts switched at the same boundary
(`TimestepExperts`, one guidance scale for both, as WanPipeline with `guidance_scale_2=None`), so its guided ODE equals
WanPipeline's from the same noise.

The student is one network, and starts from the low-noise expert `transformer_2`:

- where training looks: sCD's time proposal (ln sigma ~ N(-1, 1.4^2), sigma = s / (1 - s)) puts about 98% of the
  training times below Wan 2.2's boundary (s < 0.875, i.e. sigma < 7), where the teacher's targets come from
  `transformer_2`; starting there, the student equals its teacher on nearly all of its loss at step 0, and only the
  high-noise end (the first step of a 1-2 step sampler, from pure noise) has to move;
- what the sampler needs: the 2-step sampler's second evaluation (t = 1.1, s ~ 0.5) is in the low-noise expert's
  range, and every output of a consistency model is a clean x0, the detail that the low-noise expert was trained for;
- practice: step-distilled Wan 2.2 releases that keep one network per range (e.g. Lightning's 4-step LoRAs) carry a
  low-noise one for the final, detail-forming steps; sCM/rCM-style distillation of a single student starts it from
  the teacher that covers most of the time proposal's mass.

`--student PATH` starts it from any other network (e.g. the high-noise expert saved on its own). The student is saved
as a single-transformer WanPipeline folder (no `transformer_2`, no `boundary_ratio`). A LoRA student adapts the
low-noise expert (its teacher is both experts with the adapter off, `TimestepExperts.disable_adapters`); its adapter
loads into the teacher's pipeline with `load_lora_weights(folder, load_into_transformer_2=True)`.

Sampling a student in WanPipeline: WanPipeline takes no `sigmas=`, so a student folder carries
`TrigFlowFamilyScheduler` (`own_sampler="scheduler"`): `WanPipeline.from_pretrained(student)(prompt,
num_inference_steps=2, guidance_scale=1.0)` samples at the student's own times, with the same samples as
`SCMPipeline` from the same noise.
"""

import torch

from ..adapters import NetworkAdapter, get_adapter, register_adapter
from ..conditioning import PromptEncoding, VideoLatentCodec
from . import Family, register_family


__all__ = ["WanPromptEncoding", "TimestepExperts", "TimestepExpertsAdapter", "wan_teacher_network"]


class WanPromptEncoding(PromptEncoding):
    """WanPipeline's `encode_prompt`: UMT5 states (padding zeroed) as `encoder_hidden_states`, the negative prompt's
    (default: the empty prompt) for classifier-free guidance."""

    sequence_tokenizer = "tokenizer"

    def _encode(self, prompts, negative, device, guidance, embeds):
        pe, npe = self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=negative,
            do_classifier_free_guidance=guidance,
            device=device,
            **embeds,
        )
        return {"encoder_hidden_states": pe}, ({"encoder_hidden_states": npe} if guidance else None)


class TimestepExperts(torch.nn.Module):
    """
    Two networks of one architecture switched at a boundary timestep, as a mixture-of-experts pipeline calls them
    (Wan 2.2 A14B): `high_noise` for timesteps t >= `boundary_timestep`, `low_noise` below, t in the scheduler's
    convention (1000 s for flow matching). A batch with samples on both sides is split, each part through its expert.
    It is a frozen teacher's network (`TrigFlowDenoiser(TimestepExperts(...), ...)`); a student is one network,
    `student_network()`.

    Args:
        high_noise (`torch.nn.Module`): the expert for t >= boundary (WanPipeline's `transformer`).
        low_noise (`torch.nn.Module`): the expert for t < boundary (WanPipeline's `transformer_2`).
        boundary_timestep (`float`): the boundary, `boundary_ratio * num_train_timesteps`.
        student_expert (`str`, defaults to `"low_noise"`): the expert a student starts from (see the module
            docstring for why the low-noise one).
    """

    def __init__(self, high_noise, low_noise, boundary_timestep: float, student_expert: str = "low_noise"):
        super().__init__()
        if student_expert not in ("high_noise", "low_noise"):
            raise ValueError(f"student_expert must be 'high_noise' or 'low_noise', got {student_expert!r}.")
        self.high_noise, self.low_noise = high_noise, low_noise
        self.boundary_timestep = float(boundary_timestep)
        self.student_expert = student_expert

    @property
    def config(self):
        """The experts' configuration (they share one architecture)."""
        return self.high_noise.config

    @property
    def dtype(self) -> torch.dtype:
        return self.high_noise.dtype

    @property
    def device(self) -> torch.device:
        return self.high_noise.device

    def student_network(self) -> torch.nn.Module:
        """The expert a single-network student starts from."""
        return getattr(self, self.student_expert)

    def disable_adapters(self):
        """Switch off LoRA adapters in the experts that have them (a LoRA student on one expert, whose base weights
        remain the teacher's)."""
        for expert in (self.high_noise, self.low_noise):
            if getattr(expert, "_hf_peft_config_loaded", False):
                expert.disable_adapters()

    def enable_adapters(self):
        for expert in (self.high_noise, self.low_noise):
            if getattr(expert, "_hf_peft_config_loaded", False):
                expert.enable_adapters()

    def expert_mask(self, timestep: torch.Tensor) -> torch.Tensor:
        """True where a sample's timestep is at or above the boundary (the high-noise expert)."""
        return torch.as_tensor(timestep) >= self.boundary_timestep

    def forward(self, sample: torch.Tensor, timestep, **conditioning) -> torch.Tensor:
        """The prediction of each sample by its expert, each called through its own adapter (`timestep`: one per
        sample or one for all, in the scheduler's convention)."""
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        high = self.expert_mask(timestep)
        if bool(high.all()) or bool((~high).all()):
            expert = self.high_noise if bool(high.all()) else self.low_noise
            return get_adapter(expert)(expert, sample, timestep, **conditioning)
        out = None
        for mask, expert in ((high, self.high_noise), (~high, self.low_noise)):
            part = get_adapter(expert)(expert, sample[mask], timestep[mask], **_rows(conditioning, mask, len(mask)))
            if out is None:
                out = part.new_empty((sample.shape[0], *part.shape[1:]))
            out[mask] = part
        return out


def _rows(conditioning, mask: torch.Tensor, n: int):
    """The conditioning of the samples in `mask` (tensors whose first dimension is the batch; others as they are)."""
    if isinstance(conditioning, dict):
        return {k: _rows(v, mask, n) for k, v in conditioning.items()}
    if isinstance(conditioning, torch.Tensor) and conditioning.ndim > 0 and conditioning.shape[0] == n:
        return conditioning[mask.to(conditioning.device)]
    return conditioning


class TimestepExpertsAdapter(NetworkAdapter):
    """`TimestepExperts`: each sample through its expert's own adapter (the routing is the module's forward); the
    conditioning shapes are the experts'."""

    def conditioning_shapes(self, model):
        return get_adapter(model.high_noise).conditioning_shapes(model.high_noise)

    def __call__(self, model, sample, timestep, **conditioning):
        return model(sample, timestep, **conditioning)


register_adapter(TimestepExperts, TimestepExpertsAdapter())


def wan_teacher_network(pipeline) -> torch.nn.Module:
    """The network a Wan teacher calls: Wan 2.2's two experts switched at `boundary_ratio * num_train_timesteps`
    (`TimestepExperts`), else (Wan 2.1, or a 2.2 pipeline without `transformer_2`) its `transformer`."""
    ratio = pipeline.config.get("boundary_ratio")
    second = getattr(pipeline, "transformer_2", None)
    if ratio is None or second is None:
        return pipeline.transformer
    if pipeline.transformer is None:  # a low-noise-only pipeline
        return second
    boundary = float(ratio) * pipeline.scheduler.config.num_train_timesteps
    return TimestepExperts(pipeline.transformer, second, boundary)


register_family(
    Family(
        "WanPipeline",
        WanPromptEncoding,
        codec=VideoLatentCodec,
        video=True,
        own_sampler="scheduler",
        teacher_network=wan_teacher_network,
    )
)
