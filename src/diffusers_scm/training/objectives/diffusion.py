"""The TrigFlow diffusion loss that trains teachers (SPEC.md section 1)."""

import torch

from .common import _bcast, _per_sample_sq, noised_batch


__all__ = ["TrigFlowDiffusionLoss"]


class TrigFlowDiffusionLoss:
    """TrigFlow diffusion loss E || sd F_theta(x_t, t) - v_t ||^2 (SPEC.md section 1), for training teachers.

    With `logvar_head`, EDM2-style uncertainty weighting: ||.||^2 / (sd^2 D exp(logvar)) + logvar.
    """

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -0.8, P_std: float = 1.6):
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)

    def __call__(self, model, x0, t=None, noise=None, logvar_head=None, generator=None, **conditioning):
        sd = self.sigma_data
        x0, t, z, x_t = noised_batch(x0, t, noise, sd, self.P_mean, self.P_std, generator)
        work = x0.dtype
        tb = _bcast(t, x0)
        v_t = torch.cos(tb) * z - torch.sin(tb) * x0
        per_sample = _per_sample_sq(sd * model(x_t, t, **conditioning).to(work) - v_t) / (sd**2 * x0[0].numel())
        if logvar_head is None:
            return per_sample.mean(), {"t": t.detach(), "loss": per_sample.detach()}
        logvar = logvar_head(t)
        loss = (per_sample / torch.exp(logvar) + logvar).mean()
        return loss, {"t": t.detach(), "loss": per_sample.detach(), "logvar": logvar.detach()}
