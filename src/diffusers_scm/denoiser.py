"""One interface for every network: `TrigFlowDenoiser` (k-diffusion style, SPEC.md section 2).

How a network family is called (timestep keyword and time map, conditioning, latent packing, learned variance) lives
in `diffusers_scm.adapters`; `call_network` and `TrigFlowDenoiser` use the adapter of the network's class.
"""

import torch
from torch import nn

from .adapters import NetworkAdapter, get_adapter
from .parameterizations import Parameterization, get_parameterization


__all__ = ["TrigFlowDenoiser", "call_network", "combine_guidance"]


def call_network(model, sample: torch.Tensor, timestep: torch.Tensor, adapter=None, **conditioning) -> torch.Tensor:
    """Call a diffusers (or plain) network on `(sample, timestep)` through its adapter (`get_adapter(model)` unless
    given) and return its prediction, shaped as `sample`, in the convention of the family's scheduler."""
    return (adapter or get_adapter(model))(model, sample, timestep, **conditioning)


def combine_guidance(F_c: torch.Tensor, F_u: torch.Tensor, guidance_scale) -> torch.Tensor:
    """Classifier-free guidance of TrigFlow outputs, F_c + (w - 1)(F_c - F_u) (SPEC.md section 8); `guidance_scale`
    w a number or a tensor of one per sample."""
    w = guidance_scale
    if isinstance(w, torch.Tensor):
        w = w.to(F_c).reshape(-1, *(1,) * (F_c.ndim - 1))
    return F_c + (w - 1.0) * (F_c - F_u)


class TrigFlowDenoiser(nn.Module):
    """Wrap any diffusion network so that it answers in TrigFlow: `forward(x_t, t, **conditioning) -> F`.

    Args:
        model (`nn.Module`): the network (a diffusers model or any module called as `model(sample, timestep)`),
            kept as `inner_model`.
        parameterization (`str` or `Parameterization`): the network's family ("trigflow", "edm",
            "flow_matching", "vp_epsilon", "vp_v") or a built object.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data; must match a built object's.
        adapter (`NetworkAdapter`, *optional*): how the network is called; default: the adapter of its class.
    """

    def __init__(
        self,
        model: nn.Module,
        parameterization="trigflow",
        sigma_data: float = 0.5,
        adapter: NetworkAdapter | None = None,
    ):
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
        self.adapter = adapter or get_adapter(model)

    @property
    def sigma_data(self) -> float:
        return self.parameterization.sigma_data

    def raw_output(self, x_t: torch.Tensor, t, **conditioning) -> torch.Tensor:
        """The network's own prediction at TrigFlow `(x_t, t)`, before conversion to F."""
        sample, timestep = self.parameterization.model_inputs(x_t, t)
        return self.adapter(self.inner_model, sample, timestep, **conditioning)

    def forward(self, x_t: torch.Tensor, t, **conditioning) -> torch.Tensor:
        """TrigFlow output F(x_t, t) = v_t / sigma_data (SPEC.md section 1)."""
        return self.parameterization.to_trigflow(self.raw_output(x_t, t, **conditioning), x_t, t)

    def guided(self, x_t: torch.Tensor, t, guidance_scale, conditioning: dict, uncond_conditioning: dict):
        """
        TrigFlow output of the classifier-free guided network (SPEC.md section 8): F_c + (w - 1)(F_c - F_u), both at
        the same (x_t, t). Where the family's pipeline combines its two predictions otherwise (the adapter's
        `linear_guidance` is False: Qwen-Image's norm rescale), the raw predictions are combined by the adapter's
        `guide`, as that pipeline does, and then converted to F.

        Args:
            guidance_scale (`float` or `torch.Tensor`): w, a number or one per sample.
            conditioning (`dict`), uncond_conditioning (`dict`): the conditional and unconditional inputs.
        """
        if self.adapter.linear_guidance:
            F_c = self(x_t, t, **conditioning).to(x_t.dtype)
            return combine_guidance(F_c, self(x_t, t, **uncond_conditioning).to(x_t.dtype), guidance_scale)
        cond = self.raw_output(x_t, t, **conditioning)
        uncond = self.raw_output(x_t, t, **uncond_conditioning)
        raw = self.adapter.guide(cond, uncond, guidance_scale)
        return self.parameterization.to_trigflow(raw, x_t, t).to(x_t.dtype)

    def denoise(self, x_t: torch.Tensor, t, **conditioning) -> torch.Tensor:
        """Consistency function / data estimate f(x_t, t) = cos(t) x_t - sin(t) sigma_data F (SPEC.md section 1)."""
        return self.parameterization.predict_x0(self.raw_output(x_t, t, **conditioning), x_t, t)
