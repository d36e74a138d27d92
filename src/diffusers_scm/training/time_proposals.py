"""Training-time proposals in TrigFlow time (SPEC.md section 3)."""

import math

import torch


__all__ = ["lognormal_times", "clamp_times", "TRAIN_TIME_EPS"]

# Training times stay this far from 0 and pi/2 (SPEC.md pitfall 8).
TRAIN_TIME_EPS = 1e-4


def clamp_times(t: torch.Tensor, eps: float = TRAIN_TIME_EPS) -> torch.Tensor:
    return t.clamp(eps, math.pi / 2 - eps)


def lognormal_times(
    batch_size: int,
    P_mean: float = -1.0,
    P_std: float = 1.4,
    sigma_data: float = 0.5,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """tau ~ N(P_mean, P_std^2), t = arctan(exp(tau) / sigma_data) (SPEC.md section 3), float32, shape (batch,)."""
    tau = torch.randn(batch_size, generator=generator, device=device if generator is None else generator.device)
    tau = tau.to(device) * P_std + P_mean
    return clamp_times(torch.atan(torch.exp(tau) / sigma_data))
