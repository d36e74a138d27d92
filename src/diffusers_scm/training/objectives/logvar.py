"""The adaptive-weighting head w_phi(t) (SPEC.md section 3; EDM2's uncertainty head). Training only."""

import math

import torch
from torch import nn


class LogVarHead(nn.Module):
    """logvar = Linear(sinusoidal_embedding(t)): a 128-channel positional embedding of t, then one linear layer.

    Args:
        channels (`int`, defaults to 128): embedding width.
        max_period (`float`, defaults to 10000): lowest frequency 1 / max_period of the embedding.
        time_scale (`float`, defaults to 1.0): the embedding sees `time_scale * t`.
    """

    def __init__(self, channels: int = 128, max_period: float = 10000.0, time_scale: float = 1.0):
        super().__init__()
        half = channels // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.time_scale = time_scale
        self.linear = nn.Linear(2 * half, 1)
        nn.init.zeros_(self.linear.weight)  # logvar = 0 at the start: plain weighting
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t of shape (batch,) -> logvar of shape (batch,), computed in float32 (SPEC.md pitfall 6)."""
        dtype = torch.promote_types(self.linear.weight.dtype, torch.float32)
        with torch.autocast(t.device.type, enabled=False):
            arg = self.time_scale * t.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
            emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
            # a (batch,) tensor of its own, not a view (FSDP2 hooks need owned outputs)
            return self.linear(emb.to(self.linear.weight.dtype)).squeeze(1).clone().to(dtype)
