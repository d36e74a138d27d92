"""Continuous-time consistency distillation and training (sCD, sCT; SPEC.md section 3)."""

import math

import torch

from ...jvp import jvp, unwrap_model
from .common import _bcast, _per_sample_sq, gradient_pass, nan_loss, noised_batch, teacher_velocity


__all__ = ["SCMLoss"]


class SCMLoss:
    """
    The sCD / sCT loss of SPEC.md section 3, every choice a named argument.

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        P_mean (`float`, defaults to -1.0), P_std (`float`, defaults to 1.4): log-normal time proposal.
        tangent_warmup_steps (`int`, defaults to 10000): H in r = min(1, step / H); 0 disables the warmup.
        tangent_norm_c (`float` or `None`, defaults to 0.1): c in g / (||g|| + c); `None` turns normalization off.
        tangent_norm (`str`, defaults to "l2"): "l2" (plain L2 over the sample) or "rms" (L2 / sqrt(D)).
        prior_weighting (`str`, defaults to "none"): "none" (w = 1) or "inverse_sigma" (w = 1 / (sigma_data tan t)).
        adaptive_weighting (`bool`, defaults to `True`): use the learned logvar head (pass `logvar_head`).
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance of the teacher's velocity (sCD).
        jvp_method (`str`, defaults to "forward_ad"): see `diffusers_scm.jvp.jvp`.
        jvp_dtype (`torch.dtype` or `str`, *optional*): run the JVP pass in this dtype (e.g. float32 in a bf16 step).
        jvp_backend (`str`, defaults to "auto"): JVP attention backend.
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        P_mean: float = -1.0,
        P_std: float = 1.4,
        tangent_warmup_steps: int = 10000,
        tangent_norm_c: float | None = 0.1,
        tangent_norm: str = "l2",
        prior_weighting: str = "none",
        adaptive_weighting: bool = True,
        guidance_scale: float = 1.0,
        jvp_method: str = "forward_ad",
        jvp_dtype=None,
        jvp_backend: str = "auto",
    ):
        if tangent_norm not in ("l2", "rms"):
            raise ValueError(f"Unknown tangent_norm {tangent_norm!r}: use 'l2' or 'rms'.")
        if prior_weighting not in ("none", "inverse_sigma"):
            raise ValueError(f"Unknown prior_weighting {prior_weighting!r}: use 'none' or 'inverse_sigma'.")
        self.sigma_data = float(sigma_data)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.tangent_warmup_steps = int(tangent_warmup_steps)
        self.tangent_norm_c = tangent_norm_c
        self.tangent_norm = tangent_norm
        self.prior_weighting = prior_weighting
        self.adaptive_weighting = adaptive_weighting
        self.guidance_scale = float(guidance_scale)
        self.jvp_method = jvp_method
        self.jvp_dtype = getattr(torch, jvp_dtype) if isinstance(jvp_dtype, str) else jvp_dtype
        self.jvp_backend = jvp_backend

    def warmup_ratio(self, step: int) -> float:
        """r = min(1, step / H) (SPEC.md section 3)."""
        return 1.0 if self.tangent_warmup_steps <= 0 else min(1.0, step / self.tangent_warmup_steps)

    def teacher_velocity(self, teacher, x_t, t, x0, z, conditioning, uncond_conditioning=None, guidance_scale=None):
        """dx_t/dt: sd F_teacher (with guidance F_c + (w - 1)(F_c - F_u)) for sCD; cos t z - sin t x0 for sCT.
        `guidance_scale` (a number or one per sample) overrides the configured one."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        return teacher_velocity(teacher, x_t, t, x0, z, self.sigma_data, w, conditioning, uncond_conditioning)

    def tangent_targets(
        self,
        student,
        x0: torch.Tensor,
        teacher=None,
        step: int = 0,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        uncond_conditioning: dict | None = None,
        generator: torch.Generator | None = None,
        teacher_guidance: torch.Tensor | float | None = None,
        **conditioning,
    ) -> dict:
        """
        Everything of SPEC.md section 3 that comes before the gradient pass: the noised batch, F_minus and the
        (normalized) tangent g from the JVP pass on the unwrapped student. Returns a dict with `x0`, `t`, `x_t`,
        `F_minus`, `g`, `g_norm`, `warmup_ratio` and `target_ok` (samples whose target is finite). Arguments as in
        `__call__`.
        """
        sd = self.sigma_data
        x0, t, z, x_t = noised_batch(x0, t, noise, sd, self.P_mean, self.P_std, generator)
        work = x0.dtype
        tb = _bcast(t, x0)
        cos, sin = torch.cos(tb), torch.sin(tb)
        dxdt = self.teacher_velocity(teacher, x_t, t, x0, z, conditioning, uncond_conditioning, teacher_guidance)

        # JVP pass on the unwrapped student, no gradients: F_minus and cos t sin t dF/dt (SPEC.md section 3)
        inner = unwrap_model(student)
        F_minus, jvp_out = jvp(
            lambda x, s: inner(x, s, **conditioning),
            (x_t, t),
            (cos * sin * dxdt, (cos * sin).flatten()),
            method=self.jvp_method,
            backend=self.jvp_backend,
            module=inner,
            dtype=self.jvp_dtype,
        )
        F_minus, jvp_out = F_minus.to(work).detach(), jvp_out.to(work).detach()

        # g = -cos^2 t (sd F_minus - dxdt) - r (cos t sin t x_t + sd cos t sin t dF/dt)
        r = self.warmup_ratio(step)
        g = -(cos**2) * (sd * F_minus - dxdt) - r * (cos * sin * x_t + sd * jvp_out)
        g, g_norm = self.normalize(g)
        target_ok = torch.isfinite(g.flatten(1)).all(1) & torch.isfinite(F_minus.flatten(1)).all(1)
        return {
            "x0": x0,
            "t": t,
            "x_t": x_t,
            "F_minus": F_minus,
            "g": g,
            "g_norm": g_norm,
            "warmup_ratio": r,
            "target_ok": target_ok,
        }

    def normalize(self, g: torch.Tensor):
        """`(g / (||g|| + c), ||g||)` with the configured norm ("l2" or "rms") and c; g unchanged when c is `None`."""
        g_norm = _per_sample_sq(g).sqrt()
        if self.tangent_norm == "rms":
            g_norm = g_norm / math.sqrt(g[0].numel())
        if self.tangent_norm_c is not None:
            g = g / (_bcast(g_norm, g) + self.tangent_norm_c)
        return g, g_norm

    def per_sample_loss(self, F_theta: torch.Tensor, targets: dict, logvar_head=None):
        """
        Per-sample sCM loss w(t) / (exp(logvar) D) ||F_theta - F_minus - g||^2 + logvar (SPEC.md section 3) from the
        gradient pass output `F_theta` and `tangent_targets`. Samples whose target is not finite get a zero loss with
        a zero gradient (pitfall 9). Returns `(per_sample_loss, per_sample, logvar, weight)`, where `per_sample` is
        the unweighted ||F_theta - F_minus - g||^2 / D.
        """
        t, g, F_minus, target_ok = targets["t"], targets["g"], targets["F_minus"], targets["target_ok"]
        F_theta = F_theta.to(g.dtype)
        diff = F_theta - torch.where(_bcast(target_ok, g), F_minus + g, F_theta.detach())
        per_sample = _per_sample_sq(diff) / diff[0].numel()  # ||F_theta - F_minus - g||^2 / D
        weight = (
            1.0 / (self.sigma_data * torch.tan(t)) if self.prior_weighting == "inverse_sigma" else torch.ones_like(t)
        )
        if self.adaptive_weighting:
            if logvar_head is None:
                raise ValueError("adaptive_weighting=True needs `logvar_head` (a LogVarHead), or turn it off.")
            logvar = logvar_head(t).to(g.dtype)
            per_sample_loss = weight / torch.exp(logvar) * per_sample + logvar
        else:
            logvar = torch.zeros_like(t)
            per_sample_loss = weight * per_sample
        per_sample_loss = torch.where(target_ok, per_sample_loss, torch.zeros_like(per_sample_loss))
        return per_sample_loss, per_sample, logvar, weight

    def __call__(
        self,
        student,
        x0: torch.Tensor,
        teacher=None,
        step: int = 0,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        logvar_head=None,
        uncond_conditioning: dict | None = None,
        generator: torch.Generator | None = None,
        teacher_guidance: torch.Tensor | float | None = None,
        **conditioning,
    ):
        """
        Loss for one batch. Returns `(loss, logs)`: the mean over the batch, and per-sample values for logging.

        Args:
            student (`TrigFlowDenoiser`, possibly DDP-wrapped): the network being trained.
            x0 (`torch.Tensor`): a batch of data.
            teacher (`TrigFlowDenoiser`, *optional*): the teacher (sCD); `None` means sCT.
            step (`int`): training step, for the tangent warmup.
            t, noise (`torch.Tensor`, *optional*): times (batch,) and unit Gaussian noise n (z = sigma_data n); drawn
                when not given.
            logvar_head (`LogVarHead`, *optional*): the adaptive-weighting head (required when adaptive_weighting).
            uncond_conditioning (`dict`, *optional*): the teacher's unconditional inputs for guidance.
            generator (`torch.Generator`, *optional*): for drawing t and noise.
            teacher_guidance (`float` or `torch.Tensor`, *optional*): the teacher's classifier-free guidance scale for
                this batch, one per sample for a guidance range (default: `guidance_scale`).
            conditioning: passed to student and teacher (class_labels, encoder_hidden_states, ...).
        """
        targets = self.tangent_targets(
            student, x0, teacher, step, t, noise, uncond_conditioning, generator, teacher_guidance, **conditioning
        )
        # Gradient pass through the (possibly DDP-wrapped) student: same dropout masks as the JVP pass; samples whose
        # target is not finite are left out of it and counted (pitfall 9)
        target_ok = targets["target_ok"]
        F_theta = gradient_pass(student, targets["x_t"], targets["t"], target_ok, conditioning)
        if F_theta is None:  # no finite sample: the loop skips the step
            F_theta = torch.zeros_like(targets["x_t"])
            loss = nan_loss(targets["x_t"])
        per_sample_loss, per_sample, logvar, weight = self.per_sample_loss(F_theta, targets, logvar_head)
        if target_ok.any():
            loss = per_sample_loss.sum() / target_ok.sum()
        logs = {
            "t": targets["t"].detach(),
            "loss": per_sample.detach(),
            "tangent_norm": targets["g_norm"].detach(),
            "logvar": logvar.detach(),
            "weight": weight.detach(),
            "nonfinite": (~target_ok).sum().detach(),
            "warmup_ratio": targets["warmup_ratio"],
        }
        return loss, logs
