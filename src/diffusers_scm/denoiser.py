"""One interface for every network: `TrigFlowDenoiser` (k-diffusion style, SPEC.md section 2).

`call_network` knows how diffusers networks are called (`UNet2DModel`, `UNet2DConditionModel`,
`DiTTransformer2DModel`, `Transformer2DModel`, ...) and how to read their output; plain `nn.Module`s that take
`(sample, timestep, **conditioning)` and return a tensor work too.
"""

import inspect

import torch
from torch import nn

from .parameterizations import Parameterization, get_parameterization


__all__ = ["TrigFlowDenoiser", "call_network"]


def _accepts_return_dict(model) -> bool:
    forward = getattr(model, "forward", model)
    try:
        return "return_dict" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _first_output(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"Cannot read a tensor from a network output of type {type(output).__name__}.")


def call_network(model, sample: torch.Tensor, timestep: torch.Tensor, **conditioning) -> torch.Tensor:
    """Call a diffusers (or plain) network on `(sample, timestep)` and return its prediction tensor.

    The timestep is broadcast to one value per sample; class labels, encoder states and other conditioning are
    passed through by keyword. When the network predicts a learned variance next to its mean (twice the input
    channels, as in DiT and improved DDPM), the variance channels are dropped.
    """
    timestep = torch.as_tensor(timestep, device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    kwargs = dict(conditioning)
    if _accepts_return_dict(model):
        kwargs["return_dict"] = False
    out = _first_output(model(sample, timestep, **kwargs))
    if (
        out.ndim >= 2
        and sample.ndim >= 2
        and out.shape[1] == 2 * sample.shape[1]
        and out.shape[2:] == sample.shape[2:]
    ):
        out = out[:, : sample.shape[1]]  # learned-variance channels: keep the mean prediction
    return out


class TrigFlowDenoiser(nn.Module):
    """Wrap any diffusion network so that it answers in TrigFlow: `forward(x_t, t, **conditioning) -> F`.

    Args:
        model (`nn.Module`): the network (a diffusers model or any module called as `model(sample, timestep)`),
            kept as `inner_model`.
        parameterization (`str` or `Parameterization`): the network's family ("trigflow", "edm",
            "flow_matching", "vp_epsilon", "vp_v") or a built object.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data; must match a built object's.
    """

    def __init__(self, model: nn.Module, parameterization="trigflow", sigma_data: float = 0.5):
        super().__init__()
        if not callable(model):
            raise TypeError(f"TrigFlowDenoiser needs a callable network, got {type(model).__name__}.")
        if isinstance(parameterization, Parameterization):
            if abs(parameterization.sigma_data - sigma_data) > 1e-12:
                raise ValueError(
                    f"sigma_data={sigma_data} differs from the parameterization's {parameterization.sigma_data}; "
                    "pass the same value to both."
                )
        else:
            parameterization = get_parameterization(parameterization, sigma_data=sigma_data)
        self.inner_model = model
        self.parameterization = parameterization

    @property
    def sigma_data(self) -> float:
        return self.parameterization.sigma_data

    def raw_output(self, x_t: torch.Tensor, t, **conditioning) -> torch.Tensor:
        """The network's own prediction at TrigFlow `(x_t, t)`, before conversion to F."""
        sample, timestep = self.parameterization.model_inputs(x_t, t)
        return call_network(self.inner_model, sample, timestep, **conditioning)

    def forward(self, x_t: torch.Tensor, t, **conditioning) -> torch.Tensor:
        """TrigFlow output F(x_t, t) = v_t / sigma_data (SPEC.md section 1)."""
        return self.parameterization.to_trigflow(self.raw_output(x_t, t, **conditioning), x_t, t)

    def denoise(self, x_t: torch.Tensor, t, **conditioning) -> torch.Tensor:
        """Consistency function / data estimate f(x_t, t) = cos(t) x_t - sin(t) sigma_data F (SPEC.md section 1)."""
        return self.parameterization.predict_x0(self.raw_output(x_t, t, **conditioning), x_t, t)
