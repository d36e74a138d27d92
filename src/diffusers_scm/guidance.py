"""Guidance by a second network, the EDM2 way (SPEC.md section 10): D = D_g + w (D - D_g).

The guiding network is a smaller frozen one: EDM2's unconditional XS (classifier-free guidance with a separate
unconditional network) or a smaller, shorter-trained version of the main network (autoguidance). At a fixed (x_t, t)
the data estimate x0 = cos(t) x_t - sin(t) sd F is affine in F with the same coefficients for both networks, so the
guided TrigFlow velocity is the same combination, F_g + w (F - F_g) (SPEC.md sections 1 and 10).

`GuidedDenoiser(teacher, guide, w)` answers like a `TrigFlowDenoiser` (`forward(x_t, t, **conditioning) -> F`), so
every loss that calls a teacher (sCD, CD, TCM, DMD) distills the guided ODE without a change. `SCMPipeline` takes the
guiding network as its `guidance_model` component for sampling a teacher.
"""

import torch
from torch import nn


__all__ = ["GuidedDenoiser", "takes_class_labels", "guidance_conditioning"]

# config keys that make a network class-conditional (EDM/EDM2/SCMUNet `num_classes`, UNet2DModel, DiT)
_CLASS_CONFIG_KEYS = ("num_classes", "num_class_embeds", "class_embed_type", "num_embeds_ada_norm")


def takes_class_labels(network) -> bool:
    """Whether `network` (a diffusers model, or a denoiser around one) reads `class_labels`; a network without a
    config is assumed to."""
    network = getattr(network, "inner_model", network)
    config = getattr(network, "config", None)
    if config is None:
        return True
    return any(config.get(key) for key in _CLASS_CONFIG_KEYS)


def guidance_conditioning(network, conditioning: dict) -> dict:
    """The conditioning of the guiding network: the main network's, without `class_labels` for a guiding network that
    has no classes (EDM2's unconditional XS)."""
    if "class_labels" in conditioning and not takes_class_labels(network):
        return {k: v for k, v in conditioning.items() if k != "class_labels"}
    return conditioning


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


class GuidedDenoiser(nn.Module):
    """
    A denoiser guided by a second network: F = F_g + w (F_main - F_g), equivalently D = D_g + w (D_main - D_g)
    (SPEC.md section 10). Plain torch operations on the two outputs, so it is differentiable (forward and reverse
    mode) wherever the two denoisers are.

    Args:
        denoiser (`TrigFlowDenoiser`): the main network (e.g. a converted EDM2 teacher), kept as `denoiser`.
        guidance_denoiser (`TrigFlowDenoiser`): the guiding network, with the same `sigma_data` (its parameterization
            may differ: both answer in TrigFlow F).
        guidance_scale (`float` or `torch.Tensor`): w; 1 is the main network alone, EDM2 uses 1.2 to 2.9. A tensor
            gives one w per sample.
    """

    def __init__(self, denoiser: nn.Module, guidance_denoiser: nn.Module, guidance_scale: float | torch.Tensor):
        super().__init__()
        sd, sd_g = denoiser.sigma_data, guidance_denoiser.sigma_data
        if abs(sd - sd_g) > 1e-12:
            raise ValueError(
                f"The guiding network's sigma_data ({sd_g}) differs from the main network's ({sd}): the two data "
                "estimates would live on different scales. Guide with a network trained on the same data "
                "(EDM2: its XS model of the same resolution)."
            )
        self.denoiser = denoiser
        self.guidance_denoiser = guidance_denoiser
        self.guidance_scale = guidance_scale

    # the main network's interface, for the code that builds students, fake-score copies and run records from a teacher
    @property
    def inner_model(self) -> nn.Module:
        return self.denoiser.inner_model

    @property
    def parameterization(self):
        return self.denoiser.parameterization

    @property
    def adapter(self):
        return self.denoiser.adapter

    @property
    def sigma_data(self) -> float:
        return self.denoiser.sigma_data

    def denoisers(self) -> tuple[nn.Module, nn.Module]:
        """The main and the guiding denoiser (e.g. to shard each of them)."""
        return self.denoiser, self.guidance_denoiser

    def forward(self, x_t: torch.Tensor, t, **conditioning) -> torch.Tensor:
        """Guided TrigFlow output F_g + w (F - F_g) (SPEC.md section 10)."""
        F = self.denoiser(x_t, t, **conditioning)
        w = self.guidance_scale
        per_sample = isinstance(w, torch.Tensor)
        if not per_sample and w == 1.0:
            return F
        cond_g = guidance_conditioning(self.guidance_denoiser, conditioning)
        F_g = self.guidance_denoiser(x_t, t, **cond_g).to(F.dtype)
        w = _bcast(w.to(F), F) if per_sample else w
        return F_g + w * (F - F_g)

    def denoise(self, x_t: torch.Tensor, t, **conditioning) -> torch.Tensor:
        """Guided data estimate cos(t) x_t - sin(t) sd F = D_g + w (D - D_g) (SPEC.md sections 1 and 10), in
        `x_t`'s dtype."""
        F = self(x_t, t, **conditioning)
        t = torch.as_tensor(t, device=x_t.device)
        time_dtype = t.dtype if t.is_floating_point() else F.dtype
        work = torch.promote_types(torch.promote_types(x_t.dtype, F.dtype), time_dtype)
        tb = t.to(work) if t.ndim == 0 else _bcast(t.to(work), x_t)
        x0 = torch.cos(tb) * x_t.to(work) - torch.sin(tb) * self.sigma_data * F.to(work)
        return x0.to(x_t.dtype)
