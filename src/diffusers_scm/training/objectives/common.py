"""Pieces shared by the distillation objectives: noised batches, the teacher's (guided) velocity, the gradient pass
over the samples with finite targets (SPEC.md section 3, pitfall 9)."""

import torch

from ...denoiser import combine_guidance
from ...jvp import unwrap_model
from .time_proposals import clamp_times, lognormal_times


__all__ = ["null_class_conditioning", "noised_batch", "teacher_velocity", "select_samples", "gradient_pass"]


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _per_sample_sq(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).sum(1)


def select_samples(value, keep: torch.Tensor):
    """The samples of `keep` (a boolean (batch,) mask) from a conditioning value: tensors whose first dimension is the
    batch are indexed, dicts, lists and tuples are walked, anything else (a shared tensor, a scalar) passes as is."""
    if isinstance(value, torch.Tensor):
        return value[keep.to(value.device)] if value.ndim > 0 and value.shape[0] == keep.shape[0] else value
    if isinstance(value, dict):
        return {k: select_samples(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(select_samples(v, keep) for v in value)
    return value


def gradient_pass(student, x_t: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, conditioning: dict):
    """
    The gradient pass `student(x_t, t, **conditioning)` on the samples of `keep` only (SPEC.md pitfall 9): a sample
    with a non-finite target never enters the network, because masking its loss afterwards is not enough (its NaN
    activations still reach the weight gradients as 0 x NaN = NaN). Returns the output at full batch size with zeros
    in the dropped rows, or None when no sample is kept (the caller skips the step).
    """
    if bool(keep.all()):
        return student(x_t, t, **conditioning)
    if not bool(keep.any()):
        return None
    out = student(x_t[keep], t[keep], **select_samples(conditioning, keep))
    full = out.new_zeros((x_t.shape[0], *out.shape[1:]))
    return full.index_put((keep.nonzero().squeeze(1),), out)


def nan_loss(like: torch.Tensor) -> torch.Tensor:
    """The loss of a batch without a single finite sample: NaN, so that the training loop skips the step on every
    process (it checks the gathered loss)."""
    return torch.full((), float("nan"), device=like.device, dtype=like.dtype)


def noised_batch(x0, t, noise, sigma_data, P_mean, P_std, generator=None):
    """`(x0, t, z, x_t)` in float32 or wider (SPEC.md pitfall 6): t from the log-normal proposal and n ~ N(0, I) when
    not given, t clamped (pitfall 8), z = sigma_data n, x_t = cos(t) x0 + sin(t) z (SPEC.md section 1)."""
    work = torch.promote_types(x0.dtype, torch.float32)
    x0 = x0.to(work)
    if t is None:
        t = lognormal_times(x0.shape[0], P_mean, P_std, sigma_data, device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device if generator is None else generator.device)
    t = clamp_times(t.to(x0.device, work))
    z = sigma_data * noise.to(x0.device, work)
    tb = _bcast(t, x0)
    return x0, t, z, torch.cos(tb) * x0 + torch.sin(tb) * z


def teacher_velocity(
    teacher, x_t, t, x0, z, sigma_data, guidance_scale=1.0, conditioning=None, uncond_conditioning=None
) -> torch.Tensor:
    """dx_t/dt along the teacher's PF-ODE, sd F_teacher(x_t, t) with guidance F_c + (w - 1)(F_c - F_u) (w a number, or
    one per sample; where the family's pipeline combines its two predictions otherwise, as Qwen-Image's norm rescale,
    that combination: `TrigFlowDenoiser.guided`), or, without a teacher, the conditional velocity cos(t) z - sin(t) x0
    of the noised sample (SPEC.md sections 3 and 8). A teacher guided by a second network (`diffusers_scm.guidance.GuidedDenoiser`) gives
    EDM2's guided F_g + w (F - F_g) itself (SPEC.md section 10); its classifier-free `guidance_scale` is then 1."""
    conditioning = conditioning or {}
    if teacher is None:
        tb = _bcast(t, x0)
        return torch.cos(tb) * z - torch.sin(tb) * x0
    with torch.no_grad():
        per_sample = isinstance(guidance_scale, torch.Tensor)  # one w per sample (a guidance range)
        if (per_sample or guidance_scale != 1.0) and not getattr(teacher_adapter(teacher), "linear_guidance", True):
            # a family whose pipeline combines the two predictions otherwise (Qwen-Image's norm rescale)
            uncond = uncond_conditioning or null_class_conditioning(teacher, conditioning)
            return sigma_data * unwrap_model(teacher).guided(x_t, t, guidance_scale, conditioning, uncond)
        F_c = teacher(x_t, t, **conditioning).to(x_t.dtype)
        if per_sample or guidance_scale != 1.0:
            uncond = uncond_conditioning or null_class_conditioning(teacher, conditioning)
            F_c = combine_guidance(F_c, teacher(x_t, t, **uncond).to(x_t.dtype), guidance_scale)
    return sigma_data * F_c


def teacher_adapter(teacher):
    """The network adapter of a teacher (`TrigFlowDenoiser.adapter`), None for other callables."""
    return getattr(unwrap_model(teacher), "adapter", None)


def null_class_conditioning(denoiser, conditioning: dict) -> dict:
    """The unconditional counterpart of `conditioning` for classifier-free guidance: class labels replaced by the
    network's null class (DiT's label `num_embeds_ada_norm`, SCMUNet2DModel's `num_classes`)."""
    if "class_labels" not in conditioning:
        raise ValueError(
            "Guidance needs `class_labels` in the conditioning, or pass `uncond_conditioning` explicitly."
        )
    config = getattr(unwrap_model(denoiser).inner_model, "config", {})
    null = config.get("num_embeds_ada_norm") or config.get("num_classes")
    if null is None:
        raise ValueError(
            "Cannot tell the null class of this network: pass `uncond_conditioning` (e.g. {'class_labels': ...})."
        )
    labels = conditioning["class_labels"]
    return {**conditioning, "class_labels": torch.full_like(labels, int(null))}
