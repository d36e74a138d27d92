"""`SCMUNet2DModel`: a UNet for TrigFlow models with the stabilizations of SPEC.md section 7.

- time input c_noise(t) = time_scale * t through a sinusoidal positional embedding, computed in float32 (pitfall 6);
- adaptive double normalization in every residual block: y = norm(x) * pnorm(scale(emb)) + pnorm(shift(emb)),
  where pnorm sets the per-sample RMS over channels to 1 (no "1 +" on the scale);
- attention through diffusers' `Attention` (fused kernels normally, JVP-capable attention under `jvp_mode`);
- optional class conditioning with a null class (index `num_classes`) for guidance; dropout; gradient checkpointing.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


__all__ = ["SCMUNet2DModel", "SCMUNet2DOutput", "PRESETS", "pixel_norm", "sinusoidal_embedding"]


@dataclass
class SCMUNet2DOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`): the network's prediction F.
    """

    sample: torch.Tensor


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each sample's vector over dim 1 to RMS 1 (SPEC.md section 7, "pnorm"), in float32 or wider."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    return (work * torch.rsqrt(work.pow(2).mean(dim=1, keepdim=True) + eps)).to(x.dtype)


def sinusoidal_embedding(t: torch.Tensor, channels: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / half), in float32 (or wider) whatever the autocast state."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = channels // 2
    with torch.autocast(t.device.type, enabled=False):
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
        arg = t.to(dtype)[:, None] * freqs[None]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then adaptive double normalization from the embedding, SiLU, dropout, conv; skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, out_channels), out_channels, affine=False)
        self.scale = nn.Linear(emb_channels, out_channels)
        self.shift = nn.Linear(emb_channels, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale = pixel_norm(self.scale(emb))[:, :, None, None]  # (batch, C, 1, 1), RMS 1 over channels
        shift = pixel_norm(self.shift(emb))[:, :, None, None]
        h = self.norm2(h) * scale.to(h.dtype) + shift.to(h.dtype)  # adaptive double normalization
        h = self.conv2(self.dropout(nn.functional.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the pixels (diffusers `Attention`, with group norm and a residual connection)."""

    def __init__(self, channels: int, head_dim: int, groups: int, dropout: float):
        super().__init__()
        self.attn = Attention(
            query_dim=channels,
            heads=max(1, channels // head_dim),
            dim_head=head_dim,
            dropout=dropout,
            norm_num_groups=min(groups, channels),
            residual_connection=True,
            bias=True,
            upcast_softmax=True,
            _from_deprecated_attn_block=True,
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


PRESETS = {
    # parameters with 1000 classes: S 273M, M 485M, L 757M, XL 1.09B (the sCM paper's ImageNet 64 sizes: 280M, 498M,
    # 778M, 1.1B); tiny (unconditional, 3 channels): 0.77M
    "tiny": {
        "model_channels": 32,
        "channel_mult": (1, 2),
        "num_res_blocks": 1,
        "attention_resolutions": (8,),
        "sample_size": 16,
    },
    "S": {
        "model_channels": 192,
        "channel_mult": (1, 2, 3, 4),
        "num_res_blocks": 3,
        "attention_resolutions": (16, 8),
        "sample_size": 64,
    },
    "M": {
        "model_channels": 256,
        "channel_mult": (1, 2, 3, 4),
        "num_res_blocks": 3,
        "attention_resolutions": (16, 8),
        "sample_size": 64,
    },
    "L": {
        "model_channels": 320,
        "channel_mult": (1, 2, 3, 4),
        "num_res_blocks": 3,
        "attention_resolutions": (16, 8),
        "sample_size": 64,
    },
    "XL": {
        "model_channels": 384,
        "channel_mult": (1, 2, 3, 4),
        "num_res_blocks": 3,
        "attention_resolutions": (16, 8),
        "sample_size": 64,
    },
}


class SCMUNet2DModel(ModelMixin, ConfigMixin):
    """
    A UNet for TrigFlow diffusion and consistency models (SPEC.md section 7). Called like diffusers' `UNet2DModel`:
    `model(sample, timestep, class_labels=None).sample`, with `timestep` the network time c_noise = time_scale * t
    given by the "trigflow" parameterization.

    Args:
        sample_size (`int`, defaults to 32): image size.
        in_channels (`int`, defaults to 3), out_channels (`int`, *optional*): image channels (out defaults to in).
        model_channels (`int`, defaults to 64): channels at the first resolution.
        channel_mult (`tuple[int]`, defaults to (1, 2, 2)): channel multiplier per resolution.
        num_res_blocks (`int`, defaults to 2): residual blocks per resolution (encoder; the decoder has one more).
        attention_resolutions (`tuple[int]`, defaults to (8,)): resolutions with self-attention after each block.
        attention_head_dim (`int`, defaults to 64): channels per attention head.
        dropout (`float`, defaults to 0.0): dropout inside residual blocks.
        num_classes (`int`, *optional*): number of classes; label `num_classes` is the null class (unconditional),
            used when `class_labels` is None.
        embedding_channels (`int`, *optional*): width of the time/class embedding (default 4 x model_channels).
        time_embedding_channels (`int`, defaults to 128): channels of the sinusoidal embedding of c_noise.
        max_period (`float`, defaults to 10000): lowest frequency of the sinusoidal embedding is 1 / max_period.
        norm_num_groups (`int`, defaults to 32): groups of the group norms.
    """

    _no_split_modules = ["ResBlock", "AttnBlock"]  # the FSDP units (accelerate's transformer-based wrap)

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 64,
        channel_mult: tuple = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple = (8,),
        attention_head_dim: int = 64,
        dropout: float = 0.0,
        num_classes: int | None = None,
        embedding_channels: int | None = None,
        time_embedding_channels: int = 128,
        max_period: float = 10000.0,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        emb = embedding_channels or 4 * model_channels
        groups = norm_num_groups
        self.time_mlp = nn.Sequential(nn.Linear(time_embedding_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_embedding = nn.Embedding(num_classes + 1, emb) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        self.down, skips = nn.ModuleList(), [model_channels]
        channels, resolution = model_channels, sample_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(channels, model_channels * mult, emb, dropout, groups)]
                channels = model_channels * mult
                if resolution in attention_resolutions:
                    blocks.append(AttnBlock(channels, attention_head_dim, groups, dropout))
                self.down.append(nn.ModuleList(blocks))
                skips.append(channels)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(channels, channels, 3, stride=2, padding=1)]))
                skips.append(channels)
                resolution //= 2
        self.mid = nn.ModuleList(
            [
                ResBlock(channels, channels, emb, dropout, groups),
                AttnBlock(channels, attention_head_dim, groups, dropout),
                ResBlock(channels, channels, emb, dropout, groups),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [ResBlock(channels + skips.pop(), model_channels * mult, emb, dropout, groups)]
                channels = model_channels * mult
                if resolution in attention_resolutions:
                    blocks.append(AttnBlock(channels, attention_head_dim, groups, dropout))
                if level > 0 and i == num_res_blocks:
                    blocks.append(
                        nn.Sequential(
                            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1)
                        )
                    )
                    resolution *= 2
                self.up.append(nn.ModuleList(blocks))
        self.norm_out = nn.GroupNorm(min(groups, channels), channels)
        self.conv_out = nn.Conv2d(channels, out_channels or in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SCMUNet2DModel":
        """A model of a named size: "tiny" (CPU tests), or "S", "M", "L", "XL" (the sCM paper's ImageNet 64 widths)."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def embedding(self, timestep: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Time (and class) embedding, in float32 (SPEC.md pitfall 6)."""
        timestep = torch.as_tensor(timestep, device=self.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        with torch.autocast(self.device.type, enabled=False):
            t_emb = sinusoidal_embedding(timestep, self.config.time_embedding_channels, self.config.max_period)
            emb = self.time_mlp(t_emb.to(self.time_mlp[0].weight.dtype))
            if self.class_embedding is not None:
                if class_labels is None:
                    class_labels = torch.full((batch,), self.config.num_classes, device=self.device, dtype=torch.long)
                emb = emb + self.class_embedding(class_labels.to(self.device).long())
        return nn.functional.silu(emb)

    def _run(self, block, h, emb):
        if isinstance(block, (ResBlock, AttnBlock)):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return self._gradient_checkpointing_func(block, h, emb)
            return block(h, emb)
        return block(h)

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        """
        Args:
            sample (`torch.Tensor`): (batch, in_channels, height, width), the network input x_t / sigma_data.
            timestep (`torch.Tensor` or `float`): c_noise, one per sample or one for all.
            class_labels (`torch.Tensor`, *optional*): (batch,) labels; None or `num_classes` means unconditional.
            return_dict (`bool`, defaults to `True`): return an `SCMUNet2DOutput` or a tuple.
        """
        emb = self.embedding(timestep, class_labels, sample.shape[0])
        h = self.conv_in(sample)
        skips = [h]
        for blocks in self.down:
            for block in blocks:
                h = self._run(block, h, emb)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, emb)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = self._run(block, h, emb)
        out = self.conv_out(nn.functional.silu(self.norm_out(h)))
        if not return_dict:
            return (out,)
        return SCMUNet2DOutput(sample=out)
