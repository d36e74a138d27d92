"""EDM's and EDM2's training loss (Karras et al. 2022, Section 5 and Table 1; Karras et al. 2024, Eq. 21), written in
TrigFlow coordinates through the package's denoiser, so that it trains any network (SPEC.md sections 2 and 10).

    ln sigma ~ N(P_mean, P_std^2)                                   (log-normal noise levels)
    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2                 (EDM's loss weighting)
    loss = lambda(sigma) / exp(u(sigma)) ||D(x0 + sigma n; sigma) - x0||^2 / D + u(sigma)

with u the log-variance of EDM2's uncertainty weighting (u = 0 without one). In TrigFlow sigma = sd tan t and
x_t = cos(t) (x0 + sigma n) (SPEC.md section 10), and D is the data estimate cos(t) x_t - sin(t) sd F (SPEC.md
section 1), which for an "edm" network is c_skip x + c_out (raw output) (SPEC.md section 2).
"""

import torch

from ...jvp import unwrap_model
from .common import _bcast, _per_sample_sq, noised_batch


__all__ = ["EDMLoss", "NetworkLogVar", "network_logvar", "edm_loss_weight"]


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out(sigma)^2 (EDM, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMLoss:
    """
    EDM's denoising loss with EDM2's uncertainty weighting (see the module docstring), for `train_teacher.py
    --objective edm`: `loss, logs = loss_fn(denoiser, x0, t=..., noise=..., logvar_head=...)`.

    The network is called once, through `denoiser(x_t, t) -> F` (a `TrigFlowDenoiser`, or its DDP wrapper), so that
    every parameterization trains with the same loss. Since D - x0 = -sin(t) (sd F - v_t) and
    lambda(sd tan t) = 1 / (sd sin t)^2, the weighted error equals the TrigFlow diffusion loss
    ||sd F - v_t||^2 / (sd^2 D) at every noise level (SPEC.md section 1): the two objectives differ in their time
    proposal, their uncertainty head and the network's preconditioning, not in the per-sample loss.

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        P_mean (`float`, defaults to -0.4), P_std (`float`, defaults to 1.0): the log-normal noise levels (EDM2's
            ImageNet-512 values; EDM's are -1.2, 1.2 and EDM2's ImageNet-64 ones -0.8, 1.6).
    """

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -0.4, P_std: float = 1.0):
        if not (sigma_data > 0 and P_std > 0):
            raise ValueError(f"sigma_data and P_std must be positive, got {sigma_data} and {P_std}.")
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)

    def __call__(self, model, x0, t=None, noise=None, logvar_head=None, generator=None, **conditioning):
        """
        Args:
            model (`TrigFlowDenoiser`): the network in TrigFlow, `model(x_t, t, **conditioning) -> F`.
            x0 (`torch.Tensor`): clean samples (batch, ...).
            t (`torch.Tensor`, *optional*): TrigFlow times (batch,); drawn with ln(sd tan t) ~ N(P_mean, P_std^2).
            noise (`torch.Tensor`, *optional*): unit Gaussian noise n like `x0`.
            logvar_head (`callable`, *optional*): t (batch,) -> u (batch,), EDM2's uncertainty (`NetworkLogVar` for a
                network with its own head, or a `LogVarHead`); None: EDM's loss without it.
            generator (`torch.Generator`, *optional*): draws `t` and `noise` where not given.

        Returns:
            `(loss, logs)`: the batch mean, and per sample `t`, `sigma`, the weighted error `loss` (and `logvar`).
        """
        sd = self.sigma_data
        x0, t, z, x_t = noised_batch(x0, t, noise, sd, self.P_mean, self.P_std, generator)  # x_t = cos t x_sigma
        tb = _bcast(t, x0)
        sigma = sd * torch.tan(t)  # SPEC.md section 10
        F = model(x_t, t, **conditioning).to(x0.dtype)
        denoised = torch.cos(tb) * x_t - torch.sin(tb) * sd * F  # D(x0 + sigma n; sigma), SPEC.md section 1
        per_sample = edm_loss_weight(sigma, sd) * _per_sample_sq(denoised - x0) / x0[0].numel()
        logs = {"t": t.detach(), "sigma": sigma.detach(), "loss": per_sample.detach()}
        if logvar_head is None:
            return per_sample.mean(), logs
        logvar = logvar_head(t).to(per_sample.dtype).reshape(-1)  # u(sigma), EDM2 Eq. 21
        loss = (per_sample / torch.exp(logvar) + logvar).mean()
        return loss, {**logs, "logvar": logvar.detach()}


class NetworkLogVar:
    """
    The uncertainty head inside a network (EDM2's `EDM2UNet2DModel.logvar`: u = linear(MP-Fourier(c_noise))) as a
    `logvar_head` t -> u (batch,), with c_noise the network's own time input at t (its parameterization's
    `model_inputs`). Its weights are the network's: they train, are averaged by the EMA and are saved with it.

    Args:
        denoiser (`TrigFlowDenoiser`): the unwrapped denoiser whose `inner_model` has a `logvar(timestep, sample)`.
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        like = t.new_zeros(t.shape[0], 1)  # model_inputs maps a sample too; only the time input is used
        _, c_noise = self.denoiser.parameterization.model_inputs(like, t)
        with torch.autocast(t.device.type, enabled=False):  # in float32, as the network computes it (pitfall 6)
            return self.denoiser.inner_model.logvar(c_noise, like).reshape(-1)


def network_logvar(model) -> NetworkLogVar | None:
    """A `NetworkLogVar` for a denoiser (or its DDP wrapper) whose network has its own uncertainty head (a `logvar`
    method: `EDM2UNet2DModel`), else None."""
    denoiser = unwrap_model(model)
    network = getattr(denoiser, "inner_model", None)
    return NetworkLogVar(denoiser) if callable(getattr(network, "logvar", None)) else None
