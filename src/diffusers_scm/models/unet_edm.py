"""EDM's networks as diffusers models (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"; SPEC.md section 10):

- `SongUNet2DModel`: the DDPM++ and NCSN++ UNets of Song et al. 2021 ("Score-Based Generative Modeling through
  Stochastic Differential Equations"), EDM's CIFAR-10 networks (presets `DDPMPP_CIFAR10`, `NCSNPP_CIFAR10`);
- `DhariwalUNet2DModel`: ADM, the UNet of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis"),
  EDM's ImageNet 64 network (preset `ADM_IMAGENET64`).

Each is the raw network F of EDM's preconditioning D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels): it takes
the scaled sample c_in x as `sample` and c_noise as `timestep` (one value per sample, or one for all). With the "edm"
parameterization (c_noise = ln(sigma) / 4, EDMPrecond) the TrigFlow output is -F (SPEC.md section 2); VP-, VE- and
iDDPM-preconditioned checkpoints use the other c_noise maps of SPEC.md section 10. Class labels are indices
(`class_labels`, LongTensor) or one-hot rows (floating, `(batch, num_classes)`); absent labels are zero rows, as
NVlabs' Precond classes pass them. EDM's augmentation labels (`augment_dim` 9 on CIFAR-10) are `augment_labels`;
sample with none (zeros). Attention calls `F.scaled_dot_product_attention`: fused kernels normally, the JVP-capable
attention inside `diffusers_scm.jvp.jvp_mode`.

Layout of NVlabs' checkpoints, for the converter. The modules are nested as in NVlabs' `training/networks.py`, so
    NVlabs key "model.<name>" (inside EDMPrecond, VPPrecond, VEPrecond or iDDPMPrecond)  ->  "<name>" here
with every <name> unchanged: `map_noise.freqs` (NCSN++ only), `map_label`, `map_augment`, `map_layer0`, `map_layer1`;
`enc.<res>x<res>_{conv,down,block<i>,aux_down,aux_skip,aux_residual}` and
`dec.<res>x<res>_{in0,in1,up,block<i>,aux_up,aux_norm,aux_conv}` (ModuleDicts in NVlabs' order); inside a block
`norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj`; ADM's `out_norm`, `out_conv`; every layer's `weight`,
`bias` and, for up/downsampling layers, the `resample_filter` buffer. Init kwargs keep NVlabs' names except those of
`NVLABS_CONFIG_NAMES`; the Precond's `img_channels` gives `in_channels` and `out_channels` (twice it inside
iDDPMPrecond), and its `use_fp16`, `sigma_data`, `sigma_min`, `sigma_max`, `model_type` (and VP's `beta_d`,
`beta_min`, `M`, `epsilon_t`) belong to the parameterization, not to the network.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


__all__ = [
    "SongUNet2DModel",
    "DhariwalUNet2DModel",
    "EDMUNet2DOutput",
    "DDPMPP_CIFAR10",
    "NCSNPP_CIFAR10",
    "ADM_IMAGENET64",
    "NVLABS_CONFIG_NAMES",
    "class_labels_to_rows",
    "resample_2d",
]

# NVlabs' init kwarg -> ours (every other network kwarg keeps its name)
NVLABS_CONFIG_NAMES = {
    "img_resolution": "sample_size",
    "img_channels": "in_channels",
    "label_dim": "num_classes",
    "attn_resolutions": "attention_resolutions",
}

# The published configurations (EDM's train.py: --arch=ddpmpp / ncsnpp / adm, with CIFAR-10's augmentation labels)
DDPMPP_CIFAR10 = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "augment_dim": 9,
    "model_channels": 128,
    "channel_mult": [2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attention_resolutions": [16],
    "dropout": 0.13,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
NCSNPP_CIFAR10 = {
    **DDPMPP_CIFAR10,
    "embedding_type": "fourier",
    "channel_mult_noise": 2,
    "encoder_type": "residual",
    "resample_filter": [1, 3, 3, 1],
}
ADM_IMAGENET64 = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "num_classes": 1000,
    "model_channels": 192,
    "channel_mult": [1, 2, 3, 4],
    "channel_mult_emb": 4,
    "num_blocks": 3,
    "attention_resolutions": [32, 16, 8],
    "dropout": 0.10,
}


@dataclass
class EDMUNet2DOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`): the raw network output F.
    """

    sample: torch.Tensor


def class_labels_to_rows(class_labels, num_classes: int, batch: int, dtype, device) -> torch.Tensor:
    """(batch, num_classes) label rows: one-hot rows of integer indices, floating rows as given, zeros for None."""
    if class_labels is None:
        return torch.zeros(batch, num_classes, dtype=dtype, device=device)
    class_labels = torch.as_tensor(class_labels, device=device)
    if not class_labels.is_floating_point():
        if class_labels.ndim == 0:
            class_labels = class_labels.expand(batch)
        if class_labels.ndim != 1 or class_labels.numel() not in (1, batch):
            raise ValueError(f"Expected {batch} class indices, got a tensor of shape {tuple(class_labels.shape)}.")
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= num_classes):
            raise ValueError(f"Class indices must lie in [0, {num_classes}), got {class_labels.tolist()}.")
        return F.one_hot(class_labels.long(), num_classes).to(dtype).expand(batch, num_classes)
    rows = class_labels.reshape(-1, num_classes) if class_labels.numel() % num_classes == 0 else None
    if rows is None or rows.shape[0] not in (1, batch):
        raise ValueError(
            f"Floating class labels must be one-hot rows of shape ({batch}, {num_classes}), got "
            f"{tuple(class_labels.shape)}; pass integer indices otherwise."
        )
    return rows.to(dtype).expand(batch, num_classes)


def per_sample_time(timestep, batch: int, like: torch.Tensor) -> torch.Tensor:
    """c_noise as a (batch,) tensor in float32, or float64 for float64 samples or times (SPEC.md pitfall 6)."""
    timestep = torch.as_tensor(timestep, device=like.device)
    dtype = torch.float64 if torch.float64 in (timestep.dtype, like.dtype) else torch.float32
    timestep = timestep.to(dtype)
    return timestep.reshape(1).expand(batch) if timestep.numel() == 1 else timestep.reshape(batch)


def resample_kernel(taps) -> torch.Tensor:
    """The separable 2-D resampling filter outer(f, f) / sum(f)^2, shape (1, 1, k, k): [1, 1] is a 2x2 box (DDPM++,
    ADM), [1, 3, 3, 1] a binomial (NCSN++)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


def resample_2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-channel FIR downsampling (strided convolution) or upsampling (transposed convolution, gain 4) by 2."""
    if mode == "keep":
        return x
    c, k = x.shape[1], kernel.to(x.dtype).repeat(x.shape[1], 1, 1, 1)
    pad = (kernel.shape[-1] - 1) // 2
    if mode == "down":
        return F.conv2d(x, k, None, 2, pad, 1, c)
    if mode == "up":
        return F.conv_transpose2d(x, 4 * k, None, 2, pad, 0, c)
    raise ValueError(f"Unknown resampling mode {mode!r}: use 'keep', 'up' or 'down'.")


def init_weight(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Glorot (xavier) and He (kaiming) initializations, uniform or normal, as EDM's layers use them."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (2 * torch.rand(*shape) - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (2 * torch.rand(*shape) - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"Unknown init mode {mode!r}.")


class EDMLinear(nn.Module):
    """Fully connected layer y = x W^T + b with EDM's initialization."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_scale=1, bias_scale=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = {"fan_in": in_features, "fan_out": out_features}
        self.weight = nn.Parameter(init_weight([out_features, in_features], init_mode, **fans) * init_scale)
        self.bias = nn.Parameter(init_weight([out_features], init_mode, **fans) * bias_scale) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class EDMConv2d(nn.Module):
    """Convolution (kernel 0: none) with optional FIR up/downsampling before it, or fused around it (NCSN++'s
    residual encoder), with EDM's initialization."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        kernel: int,  # kernel size; 0 = resampling only
        bias: bool = True,  # learned bias
        up: bool = False,  # upsample by 2 first
        down: bool = False,  # downsample by 2 first
        resample_filter=(1, 1),  # FIR taps of the resampling
        fused_resample: bool = False,  # resample inside the convolution's padding (fewer operations)
        init_mode: str = "kaiming_normal",  # weight initialization
        init_scale: float = 1,  # weight multiplier at initialization
        bias_scale: float = 0,  # bias multiplier at initialization
    ):
        super().__init__()
        if up and down:
            raise ValueError("A convolution resamples up or down, not both.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = {"fan_in": in_channels * kernel * kernel, "fan_out": out_channels * kernel * kernel}
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(init_weight(shape, init_mode, **fans) * init_scale) if kernel else None
        self.bias = (
            nn.Parameter(init_weight([out_channels], init_mode, **fans) * bias_scale) if kernel and bias else None
        )
        self.register_buffer("resample_filter", resample_kernel(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.up and w is not None:  # upsample with the filter's padding, then convolve
            k = 4 * f.repeat(self.in_channels, 1, 1, 1)
            x = F.conv_transpose2d(x, k, None, 2, max(f_pad - w_pad, 0), 0, self.in_channels)
            x = F.conv2d(x, w, None, 1, max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:  # convolve with both paddings, then downsample
            x = F.conv2d(x, w, None, 1, w_pad + f_pad)
            x = F.conv2d(x, f.repeat(self.out_channels, 1, 1, 1), None, 2, 0, 1, self.out_channels)
        else:
            x = resample_2d(x, f, "up" if self.up else "down" if self.down else "keep") if f is not None else x
            x = F.conv2d(x, w, None, 1, w_pad) if w is not None else x
        return x if b is None else x + b.to(x.dtype)[:, None, None]


def edm_group_norm(channels: int, eps: float) -> nn.GroupNorm:
    """Group norm with min(32, channels / 4) groups (at least 4 channels per group), learned scale and shift."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


def attention_1d(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention over the pixels; qkv (N, heads * c * 3, H, W) with the channel of head h, channel i,
    part j (q, k, v) at (h c + i) 3 + j; returns (N, heads * c, H, W). softmax(q^T k / sqrt(c)) v per head. The result
    is contiguous whatever the kernel returns: the layout decides the dropout masks drawn downstream, which must match
    between a JVP pass and a gradient pass (SPEC.md pitfall 2)."""
    n, _, h, w = qkv.shape
    q, k, v = qkv.reshape(n * heads, -1, 3, h * w).unbind(2)  # each (N heads, c, HW)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (N heads, HW, c)
    return out.transpose(1, 2).reshape(n, -1, h, w).contiguous()


class UNetBlock(nn.Module):
    """Residual block with optional up/downsampling and self-attention: the union of DDPM++, NCSN++ and ADM's blocks
    (EDM's appendix on network architectures). The embedding enters as a bias (DDPM++/NCSN++) or as scale and shift
    (ADM)."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        emb_channels: int,  # embedding channels
        up: bool = False,  # upsample by 2
        down: bool = False,  # downsample by 2
        attention: bool = False,  # self-attention after the residual branch
        num_heads: int | None = None,  # attention heads (default out_channels / channels_per_head)
        channels_per_head: int = 64,  # channels per head when num_heads is None
        dropout: float = 0.0,  # dropout before the second convolution
        skip_scale: float = 1.0,  # multiplier after each residual sum (sqrt(1/2) in DDPM++/NCSN++)
        eps: float = 1e-5,  # group norm epsilon
        resample_filter=(1, 1),  # FIR taps of the resampling
        resample_proj: bool = False,  # a 1x1 convolution on a resampled skip path even without a channel change
        adaptive_scale: bool = True,  # embedding as scale and shift (ADM) rather than as a bias
        init: dict | None = None,  # init of conv0, affine, skip (and qkv unless init_attn)
        init_zero: dict | None = None,  # init of the layers that end a branch (conv1, proj)
        init_attn: dict | None = None,  # init of qkv
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else {"init_scale": 0}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = (
            0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        )
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resampling = {"up": up, "down": down, "resample_filter": resample_filter}
        self.norm0 = edm_group_norm(in_channels, eps)
        self.conv0 = EDMConv2d(in_channels, out_channels, 3, **resampling, **init)
        self.affine = EDMLinear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = edm_group_norm(out_channels, eps)
        self.conv1 = EDMConv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = EDMConv2d(in_channels, out_channels, kernel, **resampling, **init)
        if self.num_heads:
            self.norm2 = edm_group_norm(out_channels, eps)
            self.qkv = EDMConv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = EDMConv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # residual branch: norm, SiLU, conv; the embedding; norm, SiLU, dropout, conv (ADM, DDPM++)
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:  # self-attention with a residual connection
            a = attention_1d(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(c f_i), sin(c f_i)], f_i = (1 / max_positions)^(i / (half - endpoint)) (DDPM++,
    ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        i = torch.arange(half, dtype=x.dtype, device=x.device)
        freqs = (1 / self.max_positions) ** (i / (half - (1 if self.endpoint else 0)))
        arg = x[:, None] * freqs[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi c f_i), sin(2 pi c f_i)], f_i ~ N(0, scale^2) (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = x[:, None] * (2 * math.pi * self.freqs.to(x.dtype))[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class _EDMNetwork(ModelMixin, ConfigMixin):
    """What SongUNet and ADM share: labels, gradient checkpointing, presets."""

    _no_split_modules = ["UNetBlock"]  # the FSDP units
    _supports_gradient_checkpointing = True
    _presets: dict = {}

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """A network of a published configuration (see the class's presets), with `overrides` applied."""
        if name not in cls._presets:
            raise ValueError(f"Unknown {cls.__name__} preset {name!r}: choose one of {', '.join(cls._presets)}.")
        return cls(**{**cls._presets[name], **overrides})

    def _labels(self, class_labels, batch: int, like: torch.Tensor):
        """One-hot class rows (None for an unconditional network), with classifier-free label dropout in training."""
        if not self.config.num_classes:
            return None
        rows = class_labels_to_rows(class_labels, self.config.num_classes, batch, like.dtype, like.device)
        if self.training and self.config.label_dropout:
            rows = rows * (torch.rand(batch, 1, device=like.device) >= self.config.label_dropout).to(rows.dtype)
        return rows

    def _block(self, block, x, emb):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, x, emb)
        return block(x, emb)


class SongUNet2DModel(_EDMNetwork):
    """
    DDPM++ and NCSN++ (Song et al. 2021) as EDM reimplements them: the raw network F(c_in x, c_noise, labels) of EDM's
    CIFAR-10 models. Called like diffusers' `UNet2DModel`: `model(sample, timestep, class_labels=None).sample`, with
    `timestep` = c_noise.

    DDPM++: positional embedding, standard encoder and decoder, filter [1, 1]; NCSN++: Fourier embedding (twice the
    channels), residual encoder, filter [1, 3, 3, 1] (`DDPMPP_CIFAR10`, `NCSNPP_CIFAR10`, `from_preset`).

    Args:
        sample_size (`int`, defaults to 32): image resolution (names the encoder/decoder levels).
        in_channels (`int`, defaults to 3), out_channels (`int`, *optional*): image channels (out defaults to in).
        num_classes (`int`, defaults to 0): class-label dimension; 0 = unconditional.
        augment_dim (`int`, defaults to 0): augmentation-label dimension (9 for EDM's CIFAR-10); 0 = none.
        model_channels (`int`, defaults to 128): base channel count.
        channel_mult (`list[int]`, defaults to [1, 2, 2, 2]): channel multiplier per resolution.
        channel_mult_emb (`int`, defaults to 4): embedding width in units of `model_channels`.
        num_blocks (`int`, defaults to 4): residual blocks per resolution.
        attention_resolutions (`list[int]`, defaults to [16]): resolutions with self-attention.
        dropout (`float`, defaults to 0.10): dropout inside the residual blocks.
        label_dropout (`float`, defaults to 0): probability of dropping the class label in training.
        embedding_type (`str`, defaults to "positional"): "positional" (DDPM++) or "fourier" (NCSN++).
        channel_mult_noise (`int`, defaults to 1): noise-embedding width in units of `model_channels` (NCSN++: 2).
        encoder_type (`str`, defaults to "standard"): "standard", "skip" or "residual" (NCSN++).
        decoder_type (`str`, defaults to "standard"): "standard" or "skip".
        resample_filter (`list[int]`, defaults to [1, 1]): FIR taps of the resampling ([1, 3, 3, 1] for NCSN++).
    """

    _presets = {"ddpmpp-cifar10": DDPMPP_CIFAR10, "ncsnpp-cifar10": NCSNPP_CIFAR10}

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_classes: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: list = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attention_resolutions: list = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: list = (1, 1),
    ):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}.")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}.")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}.")
        out_channels = out_channels or in_channels
        resample_filter = list(resample_filter)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = {"init_mode": "xavier_uniform"}
        init_zero = {"init_mode": "xavier_uniform", "init_scale": 1e-5}
        init_attn = {"init_mode": "xavier_uniform", "init_scale": math.sqrt(0.2)}
        block_kwargs = {
            "emb_channels": emb_channels,
            "num_heads": 1,
            "dropout": dropout,
            "skip_scale": math.sqrt(0.5),
            "eps": 1e-6,
            "resample_filter": resample_filter,
            "resample_proj": True,
            "adaptive_scale": False,
            "init": init,
            "init_zero": init_zero,
            "init_attn": init_attn,
        }

        # mapping network: noise embedding (+ class and augmentation labels), two layers
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = EDMLinear(num_classes, noise_channels, **init) if num_classes else None
        self.map_augment = EDMLinear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = EDMLinear(noise_channels, emb_channels, **init)
        self.map_layer1 = EDMLinear(emb_channels, emb_channels, **init)

        # encoder; the "aux" layers carry the input image down (skip) or a residual path (NCSN++)
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = sample_size >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = EDMConv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = EDMConv2d(
                        caux, caux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = EDMConv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = EDMConv2d(
                        caux, cout, 3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attention_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # decoder; the output is the sum of the "aux" output convolutions (one, or one per level for "skip")
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = sample_size >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attention_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = EDMConv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = edm_group_norm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = EDMConv2d(cout, out_channels, 3, **init_zero)
        self.gradient_checkpointing = False

    def embedding(self, timestep, class_labels, augment_labels, sample: torch.Tensor) -> torch.Tensor:
        """Mapping network: [sin, cos] of c_noise (+ labels), then two SiLU layers (DDPM++, NCSN++)."""
        batch = sample.shape[0]
        emb = self.map_noise(per_sample_time(timestep, batch, sample))
        sin_first = emb.shape[1] // 2
        emb = torch.cat([emb[:, sin_first:], emb[:, :sin_first]], dim=1)  # [sin, cos], float32 or float64
        labels = self._labels(class_labels, batch, emb)
        if labels is not None:
            emb = emb + self.map_label(labels * math.sqrt(self.config.num_classes))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, sample, timestep, class_labels=None, augment_labels=None, return_dict: bool = True):
        """
        Args:
            sample (`torch.Tensor`): (batch, in_channels, height, width), the network input c_in x.
            timestep (`torch.Tensor` or `float`): c_noise, one per sample or one for all.
            class_labels (`torch.Tensor`, *optional*): (batch,) indices or (batch, num_classes) one-hot rows.
            augment_labels (`torch.Tensor`, *optional*): (batch, augment_dim); None = zeros (no augmentation).
            return_dict (`bool`, defaults to `True`): return an `EDMUNet2DOutput` or a tuple.
        """
        with torch.autocast(sample.device.type, enabled=False):  # the embedding in float32 (SPEC.md pitfall 6)
            emb = self.embedding(timestep, class_labels, augment_labels, sample)
        x, aux, skips = sample, sample, []
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = self._block(block, x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                h = block(x)
            elif "aux_conv" in name:
                h = block(F.silu(h))
                aux = h if aux is None else h + aux
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = self._block(block, x, emb)
        if not return_dict:
            return (aux,)
        return EDMUNet2DOutput(sample=aux)


class DhariwalUNet2DModel(_EDMNetwork):
    """
    ADM (Dhariwal & Nichol 2021) as EDM reimplements it: the raw network F(c_in x, c_noise, labels) of EDM's ImageNet
    64 model (`ADM_IMAGENET64`). Called like diffusers' `UNet2DModel`: `model(sample, timestep, class_labels).sample`,
    with `timestep` = c_noise. With `out_channels` twice `in_channels` (iDDPM's learned variance) the adapters keep
    the first half.

    Args:
        sample_size (`int`, defaults to 64): image resolution (names the encoder/decoder levels).
        in_channels (`int`, defaults to 3), out_channels (`int`, *optional*): image channels (out defaults to in).
        num_classes (`int`, defaults to 0): class-label dimension; 0 = unconditional.
        augment_dim (`int`, defaults to 0): augmentation-label dimension; 0 = none.
        model_channels (`int`, defaults to 192): base channel count.
        channel_mult (`list[int]`, defaults to [1, 2, 3, 4]): channel multiplier per resolution.
        channel_mult_emb (`int`, defaults to 4): embedding width in units of `model_channels`.
        num_blocks (`int`, defaults to 3): residual blocks per resolution.
        attention_resolutions (`list[int]`, defaults to [32, 16, 8]): resolutions with self-attention (64 channels
            per head).
        dropout (`float`, defaults to 0.10): dropout inside the residual blocks.
        label_dropout (`float`, defaults to 0): probability of dropping the class label in training.
    """

    _presets = {"adm-imagenet64": ADM_IMAGENET64}

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_classes: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: list = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attention_resolutions: list = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        emb_channels = model_channels * channel_mult_emb
        init = {"init_mode": "kaiming_uniform", "init_scale": math.sqrt(1 / 3), "bias_scale": math.sqrt(1 / 3)}
        init_zero = {"init_mode": "kaiming_uniform", "init_scale": 0, "bias_scale": 0}
        block_kwargs = {
            "emb_channels": emb_channels,
            "channels_per_head": 64,
            "dropout": dropout,
            "init": init,
            "init_zero": init_zero,
        }

        # mapping network: positional embedding (+ augmentation labels), two layers, + class labels
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = EDMLinear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = EDMLinear(model_channels, emb_channels, **init)
        self.map_layer1 = EDMLinear(emb_channels, emb_channels, **init)
        self.map_label = (
            EDMLinear(num_classes, emb_channels, bias=False, init_scale=math.sqrt(num_classes))
            if num_classes
            else None
        )

        # encoder
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = sample_size >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = EDMConv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attention_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # decoder
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = sample_size >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = res in attention_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        self.out_norm = edm_group_norm(cout, eps=1e-5)
        self.out_conv = EDMConv2d(cout, out_channels, 3, **init_zero)
        self.gradient_checkpointing = False

    def embedding(self, timestep, class_labels, augment_labels, sample: torch.Tensor) -> torch.Tensor:
        """Mapping network: [cos, sin] of c_noise (+ augmentation labels), two layers, + class embedding, SiLU."""
        batch = sample.shape[0]
        emb = self.map_noise(per_sample_time(timestep, batch, sample))  # float32 or float64
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        labels = self._labels(class_labels, batch, emb)
        if labels is not None:
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, sample, timestep, class_labels=None, augment_labels=None, return_dict: bool = True):
        """
        Args:
            sample (`torch.Tensor`): (batch, in_channels, height, width), the network input c_in x.
            timestep (`torch.Tensor` or `float`): c_noise, one per sample or one for all.
            class_labels (`torch.Tensor`, *optional*): (batch,) indices or (batch, num_classes) one-hot rows.
            augment_labels (`torch.Tensor`, *optional*): (batch, augment_dim); None = zeros (no augmentation).
            return_dict (`bool`, defaults to `True`): return an `EDMUNet2DOutput` or a tuple.
        """
        with torch.autocast(sample.device.type, enabled=False):  # the embedding in float32 (SPEC.md pitfall 6)
            emb = self.embedding(timestep, class_labels, augment_labels, sample)
        x, skips = sample, []
        for block in self.enc.values():
            x = self._block(block, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._block(block, x, emb)
        out = self.out_conv(F.silu(self.out_norm(x)))
        if not return_dict:
            return (out,)
        return EDMUNet2DOutput(sample=out)
