"""Exponential moving averages of the student's weights: EDM2's power-function EMA and a constant-decay EMA."""

import copy

import numpy as np
import torch
from torch import nn


__all__ = ["PowerFunctionEMA", "ConstantDecayEMA", "sigma_rel_to_gamma", "make_ema"]


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2: the exponent gamma of the power-function EMA whose relative standard deviation is sigma_rel."""
    t = sigma_rel**-2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots[np.isreal(roots)].real.max())


class _ShadowEMA:
    """Shadow copy of a module's floating parameters and buffers, kept in float32 (with `trainable_only`, of the
    parameters that require gradients: a LoRA student's adapter)."""

    def __init__(self, model: nn.Module, trainable_only: bool = False):
        if trainable_only:
            self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}
        else:
            state = model.state_dict()
            self.shadow = {k: v.detach().clone().float() for k, v in state.items() if v.is_floating_point()}
        self.num_updates = 0

    def beta(self) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, model: nn.Module):
        """Fold the current weights of `model` into the average."""
        self.num_updates += 1
        beta = self.beta()
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - beta)

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        """Write the averaged weights into `model` (in its own dtypes)."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))

    def averaged_model(self, model: nn.Module) -> nn.Module | None:
        """A copy of `model` holding the averaged weights. A sharded (FSDP2) `model` and average are gathered one
        tensor at a time into an unsharded copy on the main process (a collective: every process calls it, and the
        others get None); nothing is gathered between these calls, so the average stays sharded while training."""
        from .fsdp import full_tensors, is_sharded, unsharded_copy

        if not is_sharded(model):
            out = copy.deepcopy(model)
            self.copy_to(out)
            return out
        # the network's own tensors only where the average has none (buffers, or frozen parts of a LoRA student):
        # every averaged tensor is gathered once, from the average
        rest = full_tensors({k: v for k, v in model.state_dict().items() if k not in self.shadow})
        return unsharded_copy(model, {**rest, **full_tensors(self.shadow)})

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict):
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors (e.g. {sorted(missing)[:3]}): wrong checkpoint?")
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
        self.num_updates = int(state["num_updates"])


class PowerFunctionEMA(_ShadowEMA):
    """EDM2's power-function EMA: beta_n = (1 - 1/n)^(gamma + 1) after n updates, gamma from `sigma_rel`."""

    def __init__(self, model: nn.Module, sigma_rel: float = 0.05, trainable_only: bool = False):
        super().__init__(model, trainable_only)
        if not 0 < sigma_rel < 0.28:
            raise ValueError(f"sigma_rel must lie in (0, 0.28), got {sigma_rel}.")
        self.sigma_rel = sigma_rel
        self.gamma = sigma_rel_to_gamma(sigma_rel)

    def beta(self) -> float:
        return (1.0 - 1.0 / self.num_updates) ** (self.gamma + 1)


class ConstantDecayEMA(_ShadowEMA):
    """EMA with a constant decay (the first update copies the weights)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, trainable_only: bool = False):
        super().__init__(model, trainable_only)
        if not 0 <= decay < 1:
            raise ValueError(f"decay must lie in [0, 1), got {decay}.")
        self.decay = decay

    def beta(self) -> float:
        return 0.0 if self.num_updates == 1 else self.decay


def make_ema(model: nn.Module, sigma_rel: float | None = None, decay: float | None = None, trainable_only=False):
    """The EMA the training scripts use: power-function when `sigma_rel` is given, else constant `decay`;
    `trainable_only` averages only the parameters that require gradients (a LoRA student's adapter)."""
    if sigma_rel is not None and decay is not None:
        raise ValueError("Give either sigma_rel (power-function EMA) or decay (constant EMA), not both.")
    if decay is not None:
        return ConstantDecayEMA(model, decay, trainable_only)
    return PowerFunctionEMA(model, 0.05 if sigma_rel is None else sigma_rel, trainable_only)
