"""Rectified-flow (flow-matching) training of text-to-image teachers in diffusers' conventions (SPEC.md section 2):
`examples/train_teacher.py --objective flow_matching`.

    model = FlowMatchingModel(network)          # the network called as its family pipeline calls it (adapters.py)
    loss_fn = FlowMatchingLoss("logit_normal", logit_mean=0.0, logit_std=1.0)
    loss, logs = loss_fn(model, x0, generator=g, **cond)

    x_s = (1 - s) x0 + s n,   n ~ N(0, I),   target u = n - x0,   network time 1000 s (the scheduler's timestep)
    loss = E_s [ w(s) || u_theta(x_s, s) - (n - x0) ||^2 / D ]

with s drawn by diffusers' `compute_density_for_timestep_sampling` (SD3's logit-normal by default) and w(s) from
`compute_loss_weighting_for_sd3` (1 for logit-normal). The saved pipeline samples with
`FlowMatchEulerDiscreteScheduler`, which steps the same ODE dx_s/ds = u.
"""

import os

import torch

from ...adapters import get_adapter
from ..data.encoded import _tensors


__all__ = [
    "FlowMatchingModel",
    "FlowMatchingLoss",
    "flow_matching_times",
    "drop_captions",
    "network_from_config",
    "WEIGHTING_SCHEMES",
]


WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")  # diffusers' SD3 training schemes


class FlowMatchingModel(torch.nn.Module):
    """
    A diffusers network predicting the rectified-flow velocity u = n - x0 at (x_s, s), called as its family
    pipeline calls it: the adapter (`diffusers_scm.adapters`) maps the scheduler timestep `num_train_timesteps * s`
    to the network's time input (SD3: 1000 s; Flux: s; Sana: 1000 s times its `timestep_scale`) and the
    conditioning keywords.

    Args:
        network (`ModelMixin`): the diffusers network (`inner_model`, what the EMA averages and the pipeline saves).
        num_train_timesteps (`int`, defaults to 1000): the scheduler's timestep scale.
    """

    def __init__(self, network, num_train_timesteps: int = 1000):
        super().__init__()
        self.inner_model = network
        self.adapter = get_adapter(network)
        self.num_train_timesteps = num_train_timesteps

    def forward(self, x_s: torch.Tensor, s: torch.Tensor, **conditioning) -> torch.Tensor:
        timestep = s * self.num_train_timesteps  # FlowMatchEulerDiscreteScheduler: timestep = 1000 sigma
        return self.adapter(self.inner_model, x_s, timestep, **conditioning)


def flow_matching_times(
    batch_size: int,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    device="cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Flow times s in (0, 1) (s = 1 is pure noise): diffusers' `compute_density_for_timestep_sampling` (SD3's
    logit-normal s = sigmoid(N(logit_mean, logit_std^2)), the "mode" density, else uniform), then the scheduler's
    static shift s' = shift s / (1 + (shift - 1) s), as the SD3 training script draws its sigmas from the shifted
    schedule (continuous here instead of its 1000 discrete levels).
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme,
        batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )
    return shift * u / (1 + (shift - 1) * u)


class FlowMatchingLoss:
    """
    The rectified-flow loss (SPEC.md section 2): x_s = (1 - s) x0 + s n, target u = n - x0, per-sample
    w(s) * mean (u_theta(x_s, s) - u)^2 over the D elements of a sample, averaged over the batch.

    Args:
        weighting_scheme (`str`, defaults to "logit_normal"): the time density and loss weighting of diffusers' SD3
            training (`WEIGHTING_SCHEMES`).
        logit_mean, logit_std (`float`): the logit-normal density's parameters.
        mode_scale (`float`): the "mode" density's scale.
        shift (`float`, defaults to 1.0): the static time shift of the drawn s (the saved scheduler's `shift`).
    """

    def __init__(
        self,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
    ):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, not {weighting_scheme!r}."
            )
        if logit_std <= 0 or shift <= 0:
            raise ValueError(f"logit_std and shift must be positive, got {logit_std} and {shift}.")
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.mode_scale, self.shift = mode_scale, shift

    def times(self, batch_size: int, device, generator=None) -> torch.Tensor:
        return flow_matching_times(
            batch_size,
            self.weighting_scheme,
            self.logit_mean,
            self.logit_std,
            self.mode_scale,
            self.shift,
            device=device,
            generator=generator,
        )

    def __call__(self, model, x0, s=None, noise=None, generator=None, **conditioning):
        """`(loss, logs)`; `s` (B,) and `noise` (like x0) are drawn with `generator` where not given. logs: the
        per-sample unweighted `loss`, `s`, and `t` = arctan(s / (1 - s)) (the TrigFlow time of sigma_data = 1, whose
        log tan t = logit(s) buckets the loss by noise level)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        device = generator.device if generator is not None else x0.device
        if s is None:
            s = self.times(x0.shape[0], device, generator).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=device).to(x0.device)
        s = s.float()
        s_b = s.reshape(-1, *([1] * (x0.ndim - 1)))
        x_s = (1 - s_b) * x0 + s_b * noise  # SPEC.md section 2: rectified flow
        target = noise - x0  # u = dx_s/ds
        prediction = model(x_s, s, **conditioning)
        per_sample = (prediction.float() - target.float()).square().flatten(1).mean(1)
        weight = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas=s)
        loss = (weight * per_sample).mean()
        t = torch.atan2(s, 1 - s)
        return loss, {"loss": per_sample.detach(), "s": s.detach(), "t": t.detach()}


def drop_captions(cond: dict, uncond: dict, probability: float, generator: torch.Generator | None = None) -> dict:
    """Classifier-free guidance training: each sample's conditioning is replaced, with `probability`, by the
    unconditional one (the empty prompt's embeddings, as the family pipeline encodes the negative prompt ""). Every
    tensor of `cond` (nested dicts too) is mixed per sample; `uncond` is broadcast over the batch."""
    if probability <= 0:
        return cond
    first = next(v for v in _tensors(cond))
    n = first.shape[0]
    device = generator.device if generator is not None else first.device
    drop = (torch.rand(n, generator=generator, device=device) < probability).to(first.device)

    def mix(c, u):
        if isinstance(c, dict):
            return {k: mix(v, u[k]) if k in u else v for k, v in c.items()}
        if not isinstance(c, torch.Tensor):
            return c
        u = u.to(c.device, c.dtype).expand_as(c)
        return torch.where(drop.reshape(-1, *([1] * (c.ndim - 1))), u, c)

    return mix(cond, uncond)


def network_from_config(path: str):
    """
    A randomly initialized diffusers network from a config file (`config.json`, or a folder holding one): the class
    is the config's `_class_name`, which must be a diffusers model (a `ModelMixin` subclass); the global torch RNG
    initializes it.
    """
    import diffusers

    from ...utils import read_json

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"--model_config {path}: no such config file (a diffusers config.json, or its folder)."
        )
    config = read_json(file, fix="Write the network's config as JSON (the config.json of a diffusers model).")
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ValueError(
            f"{file} has no `_class_name`: a diffusers network config names its class, e.g. "
            '{"_class_name": "SD3Transformer2DModel", "num_layers": 2, ...}.'
        )
    name = config["_class_name"]
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(
            f"{file}: _class_name {name!r} is not a diffusers model class (a ModelMixin such as SD3Transformer2DModel)."
        )
    return cls.from_config(config)
